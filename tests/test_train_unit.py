"""Training components in-process (no Ray): projection modes, timestep buckets, preservation metric, exact resume,
diffusers export, data and configuration errors.

The statistics run here is a small synthetic one written in the DESIGN layout with covariances of known spectrum
(validated by the stats stage's own manifest checker), so every null space is known exactly; the end-to-end tests
(test_train_ray.py) use the real statistics stage.
"""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_fixtures import train_steps, worker_for, write_fake_statistics
from safetensors.torch import load_file, save_file

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.subject import draw_subject_image
from nullbooth.nullspace import preservation_error
from nullbooth.stats.manifest import read_manifest
from nullbooth.stats.store import load_bases
from nullbooth.storage import RunDir
from nullbooth.train.checkpoint import (
    load_training_state,
    save_training_state,
    signature_mismatches,
)
from nullbooth.train.data import open_instance_images, stack_images, take
from nullbooth.train.export import save_lora
from nullbooth.train.inputs import (
    check_statistics,
    images_digest,
    statistics_digest,
    training_signature,
)
from nullbooth.train.projection import TimestepBuckets, effective_delta, plan_projection
from nullbooth.train.worker import Worker

TIMESTEPS = [501, 1]
NULL_IMAGE = {501: 10, 1: 6}  # null-space dimension of every image-side layer per timestep (global: the smaller)
NULL_TEXT = 12


def spd(q: torch.Tensor, null: int, gen: torch.Generator) -> torch.Tensor:
    """Q diag(λ) Qᵀ: `null` eigenvalues near 1e-7 (the null space, on Q's first columns), the rest in [0.5, 2]."""
    d = q.shape[0]
    lam = torch.cat([torch.rand(null, generator=gen, dtype=torch.float64) * 1e-7 + 1e-8,
                     torch.rand(d - null, generator=gen, dtype=torch.float64) * 1.5 + 0.5])
    return (q * lam) @ q.T


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    """A complete statistics run for the tiny SD model with synthetic covariances of known spectrum (relative
    threshold 1e-3): the text null space has NULL_TEXT dimensions, every image-side one NULL_IMAGE[t]; the global
    covariance is the mean over timesteps, as the statistics stage makes it."""
    run_dir = str(tmp_path_factory.mktemp("train-unit") / "run")
    gen = torch.Generator().manual_seed(0)
    rotations: dict = {}

    def covariance(which, index: int, d: int) -> torch.Tensor:
        if which == "global":
            return sum(covariance(t, index, d) for t in TIMESTEPS) / len(TIMESTEPS)
        key = ("text" if which == "text" else index, which)
        if key not in rotations:
            q = rotations.setdefault(("q", key[0]), torch.linalg.qr(torch.randn(d, d, generator=gen,
                                                                                dtype=torch.float64))[0])
            rotations[key] = spd(q, NULL_TEXT if which == "text" else NULL_IMAGE[which], gen)
        return rotations[key]

    write_fake_statistics(run_dir, timesteps=TIMESTEPS, covariance=covariance)
    return run_dir


@pytest.fixture(scope="module")
def images():
    return stack_images([draw_subject_image(i, 32) for i in range(3)], 32)


def make_config(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", "train.train_batch_size=2", "train.learning_rate=1e-2",
                              "train.max_train_steps=8", *overrides])


def make_worker(run_dir, images, *overrides):
    return worker_for(make_config(run_dir, *overrides), images)


# ---------------------------------------------------------------------------------------------------------------
# Projection modes


def test_global_mode_keeps_every_update_in_the_null_space(fake_run, images):
    worker, manifest = make_worker(fake_run, images, "projection.mode=global")
    train_steps(worker, 3)
    bases = load_bases(RunDir(fake_run), manifest, "global")
    for name in worker.plan.protected:
        up, down = effective_delta(worker.pairs[name])
        dw = (up @ down).double()
        u = bases[name]
        assert float(dw.norm()) > 1e-4, name  # the update did move
        # ΔW·(I − U Uᵀ) is zero to float32 rounding: no component on the kept (preserved) directions.
        leak = dw - (dw @ u) @ u.T
        assert float(leak.norm()) <= 1e-6 * float(dw.norm()), name
        # The raw parameter is NOT in the null space: the parametrization is what enforces the constraint.
        raw = worker.unet.get_submodule(name).lora_A["default"].parametrizations.weight.original.detach().double()
        assert float((raw - (raw @ u) @ u.T).norm()) > 0.1 * float(raw.norm())


def test_timestep_buckets_are_nearest_collected_timesteps():
    collected = [751, 501, 251, 1]
    buckets = TimestepBuckets(collected, 1000)
    for t in range(1000):
        best = min(sorted(collected), key=lambda c: (abs(t - c), c))  # ties to the smaller timestep
        assert buckets.bucket(t) == best
    assert buckets.bucket(0) == 1 and buckets.bucket(999) == 751
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for _ in range(200):
        bucket, ts = buckets.draw(gen, 6)
        assert {buckets.bucket(int(t)) for t in ts} == {bucket}
        assert all(0 <= int(t) < 1000 for t in ts)
        seen.add(bucket)
    assert seen == set(collected)
    with pytest.raises(ValueError):
        buckets.bucket(1000)


@pytest.mark.parametrize("t", [0, 999])
def test_timestep_mode_projects_updates_with_the_bucket_basis_at_the_extremes(fake_run, images, t):
    worker, manifest = make_worker(fake_run, images, "projection.mode=timestep")
    train_steps(worker, 1)  # B is nonzero from here on, so A receives gradient
    bucket = worker.buckets.bucket(t)
    assert bucket == (1 if t == 0 else 501)
    draw = worker.draw(worker.step + 1)
    draw.timesteps = torch.full_like(draw.timesteps, t)
    draw.bucket = bucket
    before = {n: worker.pairs[n].down.weight.detach().clone().double() for n in worker.plan.protected}
    worker.train_step(draw)
    bases = load_bases(RunDir(fake_run), manifest, bucket)
    moved = 0
    for name in worker.plan.protected:
        step = worker.pairs[name].down.weight.detach().double() - before[name]
        u = bases[name]
        assert float((step - (step @ u) @ u.T).norm()) <= 1e-5 * max(float(step.norm()), 1e-12), name
        moved += float(step.norm()) > 0
    assert moved == len(worker.plan.protected)


def test_preservation_meter_equals_the_reference_formula(fake_run, images):
    worker, manifest = make_worker(fake_run, images, "projection.mode=none")
    train_steps(worker, 2)
    report = worker.preservation()
    from nullbooth.stats.store import load_layer_covariances

    run = RunDir(fake_run)
    for which in ["global", *TIMESTEPS]:
        covs = load_layer_covariances(run, manifest, which)
        got = report["per_layer"] if which == "global" else report["per_timestep"][str(which)]["per_layer"]
        expected = {}
        for name in worker.plan.protected:
            up, down = effective_delta(worker.pairs[name])
            weight = worker.unet.get_submodule(name).base_layer.weight
            expected[name] = preservation_error(up.double() @ down.double(), covs[name], weight)
            assert got[name] == pytest.approx(expected[name], rel=1e-9)
        rms = float(np.sqrt(np.mean(np.square(list(expected.values())))))
        overall = report["overall"] if which == "global" else report["per_timestep"][str(which)]["overall"]
        assert overall == pytest.approx(rms, rel=1e-9)
    assert report["overall"] > 1e-3  # plain LoRA moves the preserved outputs


# ---------------------------------------------------------------------------------------------------------------
# Resume and export


def test_resume_from_saved_state_is_exact(fake_run, images, tmp_path):
    args = ("projection.mode=timestep", "train.dropout=0.3", "train.lr_scheduler=cosine", "train.lr_warmup_steps=2",
            "train.gradient_accumulation_steps=2")
    straight, _ = make_worker(fake_run, images, *args)
    train_steps(straight, 4)
    first, _ = make_worker(fake_run, images, *args)
    train_steps(first, 2)
    save_training_state(tmp_path, step=first.step, samples_seen=first.samples_seen, signature={"k": 1},
                        trainable=first.trainable, optimizer=first.optimizer, lr_scheduler=first.lr_scheduler,
                        rng=[first.rng()])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["optimizer.safetensors", "rng.safetensors", "state.json",
                                                          "trainable.safetensors"]
    resumed, _ = make_worker(fake_run, images, *args)
    resumed.signature = {"k": 1}
    resumed.restore(load_training_state(tmp_path))
    assert resumed.step == 2 and resumed.samples_seen == 2 * 2 * 2
    train_steps(resumed, 2)
    for name, param in straight.trainable.items():
        assert torch.equal(param, resumed.trainable[name]), name
    assert resumed.lr_scheduler.get_last_lr() == straight.lr_scheduler.get_last_lr()
    resumed.signature = {"k": 2}
    with pytest.raises(NullBoothError, match=r"checkpoint was made with another configuration \(k: checkpoint has 1"):
        resumed.restore(load_training_state(tmp_path))


def test_export_loads_with_stock_diffusers_and_reproduces_the_unet(fake_run, images, tmp_path):
    from diffusers import StableDiffusionPipeline

    from nullbooth.models.registry import resolve_model_location

    worker, _ = make_worker(fake_run, images, "projection.mode=global", "train.rank=4", "train.alpha=8")
    train_steps(worker, 3)
    save_lora(StableDiffusionPipeline, tmp_path, worker.pairs, worker.lora_config)
    pipe = StableDiffusionPipeline.from_pretrained(resolve_model_location("tiny"), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))
    pipe.fuse_lora()
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 32, 64, generator=gen)
    t = torch.tensor([3, 900])
    worker.unet.eval()
    with torch.no_grad():
        trained = worker.unet(x, t, encoder_hidden_states=text).sample
        stock = pipe.unet(x, t, encoder_hidden_states=text).sample
        pipe.unfuse_lora()
        pipe.unload_lora_weights()
        base = pipe.unet(x, t, encoder_hidden_states=text).sample
    assert float((trained - base).abs().max()) > 1e-4  # the LoRA changes the output
    torch.testing.assert_close(stock, trained, atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# Data and configuration errors


def test_data_order_visits_every_image_once_per_epoch():
    order = take(seed=3, start=0, count=15, n=5, stream=0)
    for epoch in range(3):
        assert sorted(order[5 * epoch:5 * epoch + 5].tolist()) == list(range(5))
    assert not torch.equal(order[:5], order[5:10])  # a new permutation each epoch
    assert torch.equal(take(3, 7, 4, 5, 0), order[7:11])  # any window of the sequence is reproducible


def test_projection_plan_refuses_unprotected_targets_without_opt_in(fake_run):
    manifest = read_manifest(RunDir(fake_run))
    targets = {n: e["in_features"] for n, e in manifest.layers.items()}
    targets["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = 32
    with pytest.raises(NullBoothError, match=r"train.target_modules: 1 LoRA target\(s\) have no null-space basis .*"
                                             r"attn1.to_q\); .*projection.allow_unprotected: true"):
        plan_projection(make_config(fake_run), manifest, targets)
    plan = plan_projection(make_config(fake_run, "projection.allow_unprotected=true"), manifest, targets)
    assert plan.unprotected == ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
    assert plan.protected == list(manifest.layers)
    none = plan_projection(make_config(fake_run, "projection.mode=none"), manifest, targets)
    assert none.unprotected == plan.unprotected  # plain LoRA needs no opt-in
    wrong = dict(targets, **{next(iter(manifest.layers)): 999})
    with pytest.raises(NullBoothError, match="in_features 32 in the run but 999 in the model"):
        plan_projection(make_config(fake_run), manifest, wrong)
    with pytest.raises(NullBoothError, match=r"projection.mode 'global' needs the statistics"):
        plan_projection(make_config(fake_run), None, targets)


def _train_with_images(tmp_path, folder):
    from nullbooth.train.run import train

    return train(make_config(tmp_path / "run", f"train.instance_data_dir={folder}"))


def test_instance_folder_errors_name_the_problem(tmp_path):
    with pytest.raises(NullBoothError, match=r"train.instance_data_dir: '.*nowhere' is not a directory"):
        _train_with_images(tmp_path, tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".DS_Store").write_bytes(b"\0")
    with pytest.raises(NullBoothError, match=r"train.instance_data_dir: '.*empty' holds no images"):
        _train_with_images(tmp_path, empty)
    bad = tmp_path / "bad"
    bad.mkdir()
    draw_subject_image(0, 32).save(bad / "a.png")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(NullBoothError, match=r"train.instance_data_dir: .*bad/b.png is not a readable image"):
        _train_with_images(tmp_path, bad)
    (bad / "b.png").unlink()
    (bad / "notes.txt").write_text("not an image")
    with pytest.raises(NullBoothError, match=r".*bad/notes.txt is not a readable image"):
        _train_with_images(tmp_path, bad)
    (bad / "notes.txt").unlink()
    Image.new("RGB", (40, 20), (255, 0, 0)).save(bad / "c.jpg")
    loaded = open_instance_images(str(bad))
    assert [name for name, _ in loaded] == ["a.png", "c.jpg"]
    assert stack_images([img for _, img in loaded], 16).shape == (2, 16, 16, 3)


def test_an_image_whose_header_claims_30000_pixels_square_is_refused_by_name(tmp_path):
    import struct
    import zlib

    folder = tmp_path / "bomb"
    folder.mkdir()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)  # 2.7 GB of RGB once decoded; 70 bytes here
    (folder / "huge.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                                      + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    with pytest.raises(NullBoothError) as err:
        open_instance_images(str(folder))
    assert str(err.value) == (f"train.instance_data_dir: {folder / 'huge.png'} is too large to be a training image "
                              f"(over {Image.MAX_IMAGE_PIXELS * 2:,} pixels); resize it first")


def test_checkpoint_state_is_plain_json(fake_run, images, tmp_path):
    worker, _ = make_worker(fake_run, images, "projection.mode=none")
    train_steps(worker, 1)
    save_training_state(tmp_path, step=1, samples_seen=2, signature={}, trainable=worker.trainable,
                        optimizer=worker.optimizer, lr_scheduler=worker.lr_scheduler, rng=[worker.rng()])
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["step"] == 1 and state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-2)
    assert len(state["rng"][0]["python"][1]) == 625  # the Mersenne Twister state, as numbers


def test_gradient_checkpointing_changes_memory_not_results(fake_run, images):
    plain, _ = make_worker(fake_run, images, "projection.mode=global")
    checkpointed, _ = make_worker(fake_run, images, "projection.mode=global", "train.gradient_checkpointing=true")
    assert checkpointed.unet.is_gradient_checkpointing and not plain.unet.is_gradient_checkpointing
    train_steps(plain, 2)
    train_steps(checkpointed, 2)
    for name, param in plain.trainable.items():
        torch.testing.assert_close(checkpointed.trainable[name], param, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# What a checkpoint must agree on (issue 10, item 1)


def signature_of(run_dir, *overrides, instance=None, klass=None, statistics="stats-a", targets=None):
    """The training signature of a config over the fake run, with given image arrays and statistics digest."""
    config = make_config(run_dir, "train.with_prior_preservation=true", "train.class_prompt=a photo of a teapot",
                         *overrides)
    manifest = read_manifest(RunDir(run_dir))
    layers = {n: e["in_features"] for n, e in manifest.layers.items()}
    plan = plan_projection(config, manifest, targets or layers)
    instance = np.zeros((2, 8, 8, 3), np.uint8) if instance is None else instance
    klass = np.ones((2, 8, 8, 3), np.uint8) if klass is None else klass
    digests = {"statistics": statistics, "instance_images": images_digest(instance),
               "class_images": images_digest(klass) if config.train.with_prior_preservation else None}
    return training_signature(config, plan, "fp", 32, digests, manifest.threshold)


def differing_keys(a: dict, b: dict) -> list[str]:
    return [line.split(":", 1)[0] for line in signature_mismatches(a, b)]


@pytest.mark.parametrize("override, keys", [
    ("train.class_prompt=a photo of a kettle", ["class_prompt"]),
    ("train.prior_loss_weight=0.5", ["prior_loss_weight"]),
    ("train.num_class_images=3", ["num_class_images"]),
    ("train.dropout=0.5", ["dropout"]),
    ("train.max_grad_norm=0.5", ["max_grad_norm"]),
    ("train.lr_scheduler=cosine", ["lr_schedule_steps", "lr_scheduler"]),  # cosine's LR depends on the step count
    ("train.lr_warmup_steps=3", ["lr_warmup_steps"]),
    ("train.gradient_accumulation_steps=2", ["gradient_accumulation_steps"]),
    ("train.train_batch_size=3", ["train_batch_size"]),
    ("train.num_workers=2", ["num_workers"]),
    ("train.seed=1", ["seed"]),
    ("train.learning_rate=0.5", ["learning_rate"]),
    ("train.instance_prompt=a photo of zwx teapot", ["instance_prompt"]),
    ("train.with_prior_preservation=false",
     ["class_images", "class_prompt", "num_class_images", "prior_loss_weight", "with_prior_preservation"]),
    # what only changes speed, memory, bookkeeping, or how far a constant-LR run goes, may change
    ("train.max_train_steps=99", []),
    ("train.checkpoint_every=1", []),
    ("train.metrics_every=1", []),
    ("train.name=other", []),
    ("train.gradient_checkpointing=true", []),
    ("train.cpus_per_worker=2", []),
    ("train.mixed_precision=fp16", []),  # autocast runs on GPU only: without train.use_gpu nothing changes
])
def test_signature_names_every_training_input_that_changes_the_result(fake_run, override, keys):
    assert differing_keys(signature_of(fake_run), signature_of(fake_run, override)) == keys


def test_signature_covers_data_statistics_targets_and_fp16(fake_run):
    base = signature_of(fake_run)
    other = np.zeros((2, 8, 8, 3), np.uint8)
    other[0, 0, 0, 0] = 1  # one pixel of one image
    assert differing_keys(base, signature_of(fake_run, instance=other)) == ["instance_images"]
    assert differing_keys(base, signature_of(fake_run, klass=other)) == ["class_images"]
    assert differing_keys(base, signature_of(fake_run, statistics="stats-b")) == ["statistics"]
    assert differing_keys(base, signature_of(fake_run, "train.use_gpu=true", "train.mixed_precision=fp16")) == [
        "mixed_precision"]
    cosine = signature_of(fake_run, "train.lr_scheduler=cosine")
    assert differing_keys(cosine, signature_of(fake_run, "train.lr_scheduler=cosine", "train.max_train_steps=9")) == [
        "lr_schedule_steps"]
    manifest = read_manifest(RunDir(fake_run))
    to_k = {n: e["in_features"] for n, e in manifest.layers.items() if n.endswith("attn2.to_k")}
    assert differing_keys(base, signature_of(fake_run, "train.target_modules=[attn2.to_k]", targets=to_k)) == [
        "protected", "targets"]
    assert signature_of(fake_run) == base  # and it is deterministic


def copy_run(source, target):
    import shutil

    shutil.copytree(source, target)
    return str(target)


def resign(run_dir, rel: str) -> str:
    """Record the current sha256 of the run's file `rel` in its manifest (as a rebuild writing that file would)."""
    digest = hashlib.sha256(Path(run_dir, rel).read_bytes()).hexdigest()
    path = Path(run_dir, "covariance/manifest.json")
    data = json.loads(path.read_text())
    data["files"][rel] = digest
    path.write_text(json.dumps(data))
    return digest


def test_statistics_are_checked_on_the_driver_and_their_digest_names_the_run(fake_run, tmp_path):
    config = make_config(fake_run, "projection.mode=timestep")
    manifest = read_manifest(RunDir(fake_run))
    plan = plan_projection(config, manifest, {n: e["in_features"] for n, e in manifest.layers.items()})
    _, files = check_statistics(config, plan)
    assert sorted(files) == sorted(["covariance/manifest.json", "covariance/text.safetensors",
                                    "covariance/global.safetensors", "covariance/t0501.safetensors",
                                    "covariance/t0001.safetensors", "projection/text.safetensors",
                                    "projection/t0501.safetensors", "projection/t0001.safetensors"])
    digest = statistics_digest(manifest, files)
    # The same statistics collected again (another date, another actor count) are the same statistics ...
    same = copy_run(fake_run, tmp_path / "same")
    data = json.loads((tmp_path / "same/covariance/manifest.json").read_text())
    data["collection"] = {"created": "2031-01-01T00:00:00+00:00", "num_workers": 7}
    (tmp_path / "same/covariance/manifest.json").write_text(json.dumps(data))
    again_manifest, again = check_statistics(make_config(same, "projection.mode=timestep"), plan)
    assert statistics_digest(again_manifest, again) == digest
    # ... statistics with another basis (a valid file, under the same manifest) are not.
    other = copy_run(same, tmp_path / "other")
    tensors = load_file(f"{other}/projection/t0001.safetensors")
    name = next(k for k in tensors if k.endswith(".basis"))
    tensors[name] = -tensors[name]  # the same null space, another basis: every byte of it changes
    save_file(tensors, f"{other}/projection/t0001.safetensors")
    new_sha = resign(other, "projection/t0001.safetensors")
    other_manifest, changed = check_statistics(make_config(other, "projection.mode=timestep"), plan)
    assert other_manifest.files == {**again_manifest.files, "projection/t0001.safetensors": new_sha}
    assert sorted(rel for rel in files if changed[rel] != again[rel]) == ["covariance/manifest.json",
                                                                          "projection/t0001.safetensors"]
    assert statistics_digest(other_manifest, changed) != digest


def test_a_bad_statistics_file_is_refused_on_the_driver_and_a_changed_one_by_the_worker(fake_run, images, tmp_path):
    import pickle

    run_dir = copy_run(fake_run, tmp_path / "run")
    config = make_config(run_dir, "projection.mode=global")
    manifest = read_manifest(RunDir(run_dir))
    plan = plan_projection(config, manifest, {n: e["in_features"] for n, e in manifest.layers.items()})
    _, plan.files = check_statistics(config, plan)
    basis = tmp_path / "run/projection/global.safetensors"
    original = basis.read_bytes()
    basis.write_bytes(pickle.dumps({"basis": [1.0, 2.0]}))
    with pytest.raises(NullBoothError) as err:  # the manifest's digest catches it first ...
        check_statistics(config, plan)
    assert str(err.value).startswith(f"{run_dir}/projection/global.safetensors: its content does not match the "
                                     "sha256 recorded in ")
    assert "\n" not in str(err.value)
    resign(run_dir, "projection/global.safetensors")
    with pytest.raises(NullBoothError) as err:  # ... and with a digest that matches, the format check
        check_statistics(config, plan)
    assert str(err.value).startswith(f"{run_dir}/projection/global.safetensors is not a valid safetensors file (")
    assert "\n" not in str(err.value)
    # A valid file changed between the driver's check and the worker's read: refused by the worker, by name.
    tensors = load_file(str(tmp_path / "run/projection/t0001.safetensors"))
    basis.write_bytes(original)
    resign(run_dir, "projection/global.safetensors")
    _, plan.files = check_statistics(config, plan)
    save_file(tensors, str(tmp_path / "run/projection/text.safetensors"))
    with pytest.raises(NullBoothError, match=rf"^{run_dir}/projection/text.safetensors: changed after the driver "
                                             r"checked it \(sha256 [0-9a-f]{16}, checked [0-9a-f]{16}\)"):
        Worker(config, plan, images, None)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint integrity (issue 10, item 7)


@pytest.fixture
def saved_state(fake_run, images, tmp_path):
    worker, _ = make_worker(fake_run, images, "projection.mode=none")
    train_steps(worker, 1)
    save_training_state(tmp_path, step=1, samples_seen=2, signature={"k": 1}, trainable=worker.trainable,
                        optimizer=worker.optimizer, lr_scheduler=worker.lr_scheduler, rng=[worker.rng()])
    return tmp_path


def test_checkpoint_state_records_the_digest_of_every_file(saved_state):
    import hashlib

    state = json.loads((saved_state / "state.json").read_text())
    assert state["files"] == {name: hashlib.sha256((saved_state / name).read_bytes()).hexdigest()
                              for name in ("optimizer.safetensors", "rng.safetensors", "trainable.safetensors")}
    assert load_training_state(saved_state).step == 1


def rewrite_state(directory, edit):
    """state.json edited by `edit(state)`, its own digest recomputed as a careful forger would."""
    import hashlib

    state = json.loads((directory / "state.json").read_text())
    edit(state)
    state.pop("digest")
    state["digest"] = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()
    (directory / "state.json").write_text(json.dumps(state))


def test_a_tampered_checkpoint_is_refused_by_name_and_never_unpickled(saved_state):
    import hashlib
    import pickle

    where = f"checkpoint {saved_state}: "

    def refused() -> str:
        with pytest.raises(NullBoothError) as err:
            load_training_state(saved_state)
        assert "\n" not in str(err.value) and str(err.value).startswith(where)
        return str(err.value)[len(where):]

    original = (saved_state / "state.json").read_text()
    (saved_state / "state.json").write_text(original[:-20])
    assert refused().startswith("state.json is not valid JSON (")
    (saved_state / "state.json").write_text(original.replace('"step": 1', '"step": 5'))
    assert refused() == "state.json: its content does not match its digest (the file was edited)"
    (saved_state / "state.json").write_text(original)
    rewrite_state(saved_state, lambda s: s.update(step="one"))
    assert refused() == "state.json: field 'step' must be a non-negative integer"
    (saved_state / "state.json").write_text(original)
    rewrite_state(saved_state, lambda s: s.pop("scaler"))
    assert refused() == "state.json: field 'scaler' is missing (written by an older NullBooth?)"
    (saved_state / "state.json").write_text(original)

    class Boom:
        def __reduce__(self):
            return (print, ("unpickled!",))

    payload = pickle.dumps({"torch.0": Boom()})
    rng = (saved_state / "rng.safetensors").read_bytes()
    (saved_state / "rng.safetensors").write_bytes(payload)
    assert refused() == "rng.safetensors does not match the sha256 recorded in state.json (changed or replaced)"
    rewrite_state(saved_state, lambda s: s["files"].update({"rng.safetensors": hashlib.sha256(payload).hexdigest()}))
    assert refused().startswith("rng.safetensors is not a valid safetensors file (")
    (saved_state / "state.json").write_text(original)
    (saved_state / "rng.safetensors").write_bytes(rng)
    assert load_training_state(saved_state).step == 1  # restored: loads again
    (saved_state / "trainable.safetensors").unlink()
    assert refused() == "trainable.safetensors is missing"


# ---------------------------------------------------------------------------------------------------------------
# fp16 loss scale (issue 10, item 12) and DDP buffers (item 13)


def test_the_gradient_scaler_state_is_checkpointed_and_restored_exactly(fake_run, images, tmp_path):
    """The loss scale grows every step here (growth_interval 1); a resumed worker must continue from the scale
    the run had reached, not from its initial scale. A CPU GradScaler stands in for CUDA's: same state."""
    def worker_with_scaler():
        worker, _ = make_worker(fake_run, images, "projection.mode=global")
        worker.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=1)
        return worker

    straight = worker_with_scaler()
    train_steps(straight, 3)
    first = worker_with_scaler()
    train_steps(first, 2)
    assert first.scaler.get_scale() == 2.0 ** 12
    save_training_state(tmp_path, step=first.step, samples_seen=first.samples_seen, signature={}, rng=[first.rng()],
                        trainable=first.trainable, optimizer=first.optimizer, lr_scheduler=first.lr_scheduler,
                        scaler=first.scaler)
    state = load_training_state(tmp_path)
    assert state.scaler == first.scaler.state_dict()
    resumed = worker_with_scaler()
    resumed.restore(state)
    assert resumed.scaler.state_dict() == first.scaler.state_dict()
    train_steps(resumed, 1)
    assert resumed.scaler.get_scale() == straight.scaler.get_scale() == 2.0 ** 13
    for name, param in straight.trainable.items():
        assert torch.equal(param, resumed.trainable[name]), name


def test_ddp_does_not_broadcast_the_constant_bases_every_forward(fake_run, images, monkeypatch):
    """The loop wraps the UNet with distributed.data_parallel (Ray Train's prepare_model, given DDP's options);
    here prepare_model is replaced by a plain DDP wrapper in a one-process gloo group, and every broadcast that
    DDP makes is counted."""
    import ray.train.torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from nullbooth.train.distributed import data_parallel

    worker, _ = make_worker(fake_run, images, "projection.mode=global")
    bases = [name for name, _ in worker.unet.named_buffers()]
    assert len(bases) == len(worker.plan.protected) and all(n.endswith(".basis") for n in bases)
    calls = []
    broadcast = dist._broadcast_coalesced
    monkeypatch.setattr(dist, "_broadcast_coalesced", lambda *a, **k: calls.append(1) or broadcast(*a, **k))
    monkeypatch.setattr(ray.train.torch, "prepare_model",
                        lambda module, move_to_device, parallel_strategy, parallel_strategy_kwargs=None:
                        DistributedDataParallel(module, **(parallel_strategy_kwargs or {})))
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        worker.model = data_parallel(worker.unet, world=2)
        assert isinstance(worker.model, DistributedDataParallel)
        at_wrap = len(calls)  # DDP syncs parameters and buffers once, when it wraps the model
        worker.train_step()
        worker.train_step()
        assert len(calls) == at_wrap
        assert not worker.model.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()
