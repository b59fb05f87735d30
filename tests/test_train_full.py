"""train.adapter full in-process (no Ray): the protected linears' weights trained directly, as W₀ + ΔW·U·Uᵀ in
global mode, with projected updates in timestep mode, unconstrained in none; the merged UNet export; exact resume;
the preservation error; the config.

The statistics are a synthetic run (run_fixtures.write_fake_statistics: random low-rank covariances, so every null
space is a proper subspace, known exactly). The Ray end-to-end path is in test_train_full_ray.py.
"""

import pytest
import torch
import torch.nn.functional as F
from run_fixtures import train_steps, worker_for, write_fake_statistics

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.subject import draw_subject_image
from nullbooth.nullspace import preservation_error
from nullbooth.stats.manifest import read_manifest
from nullbooth.stats.store import load_bases, load_layer_covariances
from nullbooth.storage import RunDir
from nullbooth.train.checkpoint import (
    load_training_state,
    save_training_state,
    signature_mismatches,
)
from nullbooth.train.data import stack_images
from nullbooth.train.full import save_unet
from nullbooth.train.inputs import training_signature
from nullbooth.train.projection import plan_projection

TIMESTEPS = [801, 401, 1]


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("train-full") / "run")
    write_fake_statistics(run_dir, timesteps=TIMESTEPS)
    return run_dir


@pytest.fixture(scope="module")
def images():
    return stack_images([draw_subject_image(i, 32) for i in range(3)], 32)


def make_worker(run_dir, images, *overrides):
    return worker_for(load_config(None, [f"run_dir={run_dir}", "train.adapter=full", "train.train_batch_size=2",
                                         "train.learning_rate=1e-3", "train.max_train_steps=8", *overrides]), images)


def leak(delta: torch.Tensor, basis: torch.Tensor) -> float:
    """‖ΔW(I − UUᵀ)‖ / ‖ΔW‖ in float64."""
    delta, basis = delta.double(), basis.double()
    return float((delta - (delta @ basis) @ basis.T).norm() / delta.norm())


@pytest.fixture(scope="module")
def global_worker(fake_run, images):
    worker, manifest = make_worker(fake_run, images, "projection.mode=global")
    train_steps(worker, 3)
    return worker, manifest


# ---------------------------------------------------------------------------------------------------------------
# The constraint


def test_global_update_has_no_component_outside_the_null_space(fake_run, global_worker):
    worker, manifest = global_worker
    bases = load_bases(RunDir(fake_run), manifest, "global")
    assert sorted(worker.full.layers) == sorted(worker.plan.protected) == sorted(manifest.layers)
    for name in worker.plan.protected:
        delta = worker.full.effective_delta(name)
        assert float(delta.norm()) > 1e-4, name  # the weights did move
        assert leak(delta, bases[name]) <= 1e-6, name
        # What enforces it is the parametrization: the raw trained parameter has a large component outside.
        assert leak(worker.full.updates()[name].detach(), bases[name]) > 0.1, name
        # The layer's weight in the forward pass is W₀ + ΔW_eff, and W₀ is the model's own weight.
        layer = worker.unet.get_submodule(name)
        torch.testing.assert_close(layer.weight, worker.full.base_weight(name) + delta, atol=1e-6, rtol=0)


def test_global_layer_outputs_on_preserved_keys_do_not_move(fake_run, global_worker):
    """Keys in the covariance's row space (the kept eigenvectors: what preserved prompts feed the layer) give the
    base layer's output; keys in the null space do not (the layer did learn something)."""
    worker, manifest = global_worker
    covs = load_layer_covariances(RunDir(fake_run), manifest, "global")
    bases = load_bases(RunDir(fake_run), manifest, "global")
    gen = torch.Generator().manual_seed(3)
    for name in worker.plan.protected:
        layer = worker.unet.get_submodule(name)
        null = bases[name]
        lam, vecs = torch.linalg.eigh(covs[name])
        kept = vecs[:, null.shape[1]:]  # eigh sorts ascending: the null space is the first k eigenvectors
        assert float((kept.T @ null).abs().max()) < 1e-6  # ... and it is the stored basis's complement
        preserved = (torch.randn(16, kept.shape[1], generator=gen, dtype=torch.float64) @ kept.T).float()
        outside = (torch.randn(16, null.shape[1], generator=gen, dtype=torch.float64) @ null.T).float()
        w0, bias = worker.full.base_weight(name), layer.bias
        with torch.no_grad():
            scale = float(F.linear(preserved, w0, bias).abs().max())
            moved = float((layer(preserved) - F.linear(preserved, w0, bias)).abs().max())
            moved_null = float((layer(outside) - F.linear(outside, w0, bias)).abs().max())
        assert moved <= 1e-5 * scale, (name, moved, scale)
        assert moved_null > 100 * max(moved, 1e-9), (name, moved_null)


def test_none_mode_moves_the_weights_in_the_leaking_directions(fake_run, images):
    worker, manifest = make_worker(fake_run, images, "projection.mode=none")
    train_steps(worker, 3)
    bases = load_bases(RunDir(fake_run), manifest, "global")
    leaks = [leak(worker.full.effective_delta(name), bases[name]) for name in worker.plan.protected]
    assert min(leaks) > 0.1, leaks  # plain full fine-tuning: a large share of every update hits preserved keys
    assert worker.preservation()["overall"] > 1e-3


def test_timestep_mode_projects_each_update_with_its_buckets_basis(fake_run, images):
    worker, manifest = make_worker(fake_run, images, "projection.mode=timestep")
    bases = {t: load_bases(RunDir(fake_run), manifest, t) for t in TIMESTEPS}
    seen = set()
    for step in range(1, 4):
        before = {n: p.detach().clone() for n, p in worker.full.updates().items()}
        draw = worker.draw(step)
        worker.train_step(draw)
        seen.add(draw.bucket)
        for name, param in worker.full.updates().items():
            update = param.detach() - before[name]
            assert float(update.norm()) > 0, name
            assert leak(update, bases[draw.bucket][name]) <= 1e-5, (name, draw.bucket)
    # The image-side layers' null spaces differ per timestep, so the total update is not in the global one.
    global_bases = load_bases(RunDir(fake_run), manifest, "global")
    q_layer = next(n for n in worker.plan.protected if n.endswith("attn2.to_q"))
    if len(seen) > 1:
        assert leak(worker.full.effective_delta(q_layer), global_bases[q_layer]) > 1e-4


def test_preservation_error_is_the_designs_formula_on_the_full_update(fake_run, global_worker, images):
    worker, manifest = make_worker(fake_run, images, "projection.mode=none")
    train_steps(worker, 2)
    covs = load_layer_covariances(RunDir(fake_run), manifest, "global")
    report = worker.preservation()
    for name in worker.plan.protected:
        expected = preservation_error(worker.full.effective_delta(name).double(), covs[name],
                                      worker.full.base_weight(name).double())
        assert report["per_layer"][name] == pytest.approx(expected, rel=1e-6)
    # In global mode the same meter reads far less: the update only touches the keys' smallest eigen-directions
    # (eigenvalues ≤ τ; some of these synthetic covariances are full rank, so the null space is not exactly null).
    assert global_worker[0].preservation()["overall"] < 0.05 * report["overall"]


# ---------------------------------------------------------------------------------------------------------------
# Export and resume


def test_exported_unet_loads_with_stock_diffusers_and_reproduces_the_trained_one(global_worker, tmp_path):
    from diffusers import UNet2DConditionModel

    from nullbooth.models.registry import resolve_model_location

    worker, _ = global_worker
    save_unet(worker.unet, tmp_path)
    assert sorted(p.name for p in (tmp_path / "unet").iterdir()) == ["config.json",
                                                                      "diffusion_pytorch_model.safetensors"]
    stock = UNet2DConditionModel.from_pretrained(str(tmp_path), subfolder="unet").eval()
    base = UNet2DConditionModel.from_pretrained(resolve_model_location("tiny"), subfolder="unet").eval()
    gen = torch.Generator().manual_seed(1)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 32, 64, generator=gen)
    t = torch.tensor([3, 900])
    worker.unet.eval()
    try:
        with torch.no_grad():
            trained = worker.unet(x, t, encoder_hidden_states=text).sample
            loaded = stock(x, t, encoder_hidden_states=text).sample
            original = base(x, t, encoder_hidden_states=text).sample
    finally:
        worker.unet.train()
    assert float((trained - original).abs().max()) > 1e-4  # the fine-tune changes the output
    torch.testing.assert_close(loaded, trained, atol=1e-6, rtol=1e-5)
    # Only the trained linears differ from the base model's weights.
    changed = {k for k, v in stock.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {f"{name}.weight" for name in worker.plan.protected}


@pytest.mark.parametrize("mode", ["global", "timestep"])
def test_resume_from_saved_state_is_exact(fake_run, images, tmp_path, mode):
    args = (f"projection.mode={mode}", "train.lr_scheduler=cosine", "train.lr_warmup_steps=2",
            "train.gradient_accumulation_steps=2")
    straight, _ = make_worker(fake_run, images, *args)
    train_steps(straight, 4)
    first, _ = make_worker(fake_run, images, *args)
    train_steps(first, 2)
    save_training_state(tmp_path, step=first.step, samples_seen=first.samples_seen, signature={"k": 1},
                        trainable=first.trainable, optimizer=first.optimizer, lr_scheduler=first.lr_scheduler,
                        rng=[first.rng()])
    resumed, _ = make_worker(fake_run, images, *args)
    resumed.signature = {"k": 1}
    resumed.restore(load_training_state(tmp_path))
    train_steps(resumed, 2)
    assert set(straight.trainable) == set(resumed.trainable) and len(straight.trainable) == 28
    for name, param in straight.trainable.items():
        assert torch.equal(param, resumed.trainable[name]), name
    for name in straight.plan.protected:
        assert torch.equal(straight.unet.get_submodule(name).weight, resumed.unet.get_submodule(name).weight)


# ---------------------------------------------------------------------------------------------------------------
# Config and signature


def test_a_bad_adapter_value_is_one_clear_error():
    with pytest.raises(NullBoothError, match=r"^train.adapter: expected one of lora, full; got 'ful' "
                                             r"\(did you mean 'full'\?\)$"):
        load_config(None, ["train.adapter=ful"])
    with pytest.raises(NullBoothError, match=r"^train.dropout: 0.1 is LoRA dropout; train.adapter 'full'"):
        load_config(None, ["train.adapter=full", "train.dropout=0.1"])
    assert load_config(None, []).train.adapter == "lora"  # the default stays the LoRA


def test_the_adapter_is_part_of_the_training_signature(fake_run):
    manifest = read_manifest(RunDir(fake_run))
    signatures = {}
    for adapter in ("lora", "full"):
        config = load_config(None, [f"run_dir={fake_run}", f"train.adapter={adapter}"])
        plan = plan_projection(config, manifest, {n: e["in_features"] for n, e in manifest.layers.items()})
        signatures[adapter] = training_signature(config, plan, "fp", 32, {"statistics": "s", "instance_images": "i",
                                                                           "class_images": None}, None)
    diffs = signature_mismatches(signatures["lora"], signatures["full"])
    assert "adapter: checkpoint has 'lora', config has 'full'" in diffs
    assert signatures["full"]["rank"] is None and signatures["full"]["alpha"] is None  # LoRA-only: not compared
