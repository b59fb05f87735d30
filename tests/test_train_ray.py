"""The training stage end to end on a local Ray: real statistics (build_covariance) on the tiny SD and LCM models,
Ray Train runs of a few steps, the exported LoRA loaded with stock diffusers.

One statistics run per model and one training run per scenario, shared by the assertions that need it.
"""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.backends import get_backend
from nullbooth.models.registry import resolve_model_location
from nullbooth.nullspace import preservation_error, threshold_tau
from nullbooth.stats.build import build_covariance
from nullbooth.stats.manifest import read_manifest
from nullbooth.stats.store import load_layer_covariances
from nullbooth.storage import RunDir
from nullbooth.train.checkpoint import load_training_state
from nullbooth.train.data import ensure_class_images, open_instance_images, stack_images
from nullbooth.train.projection import plan_projection
from nullbooth.train.run import train
from nullbooth.train.worker import Worker

SD = ["model.backend=sd", "model.path=tiny", "sampling.scheduler=ddim", "sampling.guidance_scale=7.5"]
LCM = ["model.backend=lcm", "model.path=tiny-lcm", "sampling.scheduler=lcm", "sampling.guidance_scale=8.5"]
COMMON = ["preserve.max_prompts=20", "preserve.holdout=4", "sampling.num_inference_steps=2",
          "covariance.num_workers=1", "covariance.batch_size=8", "train.max_train_steps=6", "train.checkpoint_every=2",
          "train.metrics_every=3", "train.train_batch_size=2", "train.learning_rate=1e-2", "generate.num_workers=1"]


def cfg(run_dir, model, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *model, *COMMON, *overrides])


def lora_tensors(lora_dir) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Exported diffusers LoRA -> layer: (up, down)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(Path(lora_dir) / "pytorch_lora_weights.safetensors"), "pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            layer, kind = key.removeprefix("unet.").rsplit(".lora.", 1)
            out.setdefault(layer, {})[kind.split(".")[0]] = f.get_tensor(key)
    return {layer: (d["up"], d["down"]) for layer, d in out.items()}


def base_unet(model_path):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(resolve_model_location(model_path), subfolder="unet")


@pytest.fixture(scope="module")
def sd_stats(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train-ray") / "sd"
    build_covariance(cfg(run_dir, SD))
    return run_dir


def worker_logs() -> str:
    """The text of every worker log of this module's Ray session (worker output is not sent to the driver)."""
    import ray

    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    return "".join(p.read_text(errors="replace") for p in sorted(logs.glob("worker-*")) if p.is_file())


@pytest.fixture(scope="module")
def global_run(sd_stats):
    summary = train(cfg(sd_stats, SD, "train.name=global"))
    summary["published"] = (Path(summary["lora_dir"]) / "pytorch_lora_weights.safetensors").read_bytes()
    return summary, lora_tensors(summary["lora_dir"])


# ---------------------------------------------------------------------------------------------------------------
# global mode: the constraint, its bound, the loss, the export


def test_global_update_is_in_the_null_space_and_obeys_the_bound(sd_stats, global_run):
    summary, lora = global_run
    run = RunDir(str(sd_stats))
    manifest = read_manifest(run)
    covs = load_layer_covariances(run, manifest, "global")
    unet = base_unet("tiny")
    report = summary["report"]
    assert report["mode"] == "global" and report["step"] == 6 and report["unprotected"] == []
    assert sorted(lora) == sorted(manifest.layers) == sorted(report["protected"])
    kind, value = manifest.threshold["kind"], manifest.threshold["value"]
    for name, (up, down) in lora.items():
        dw = (up.double() @ down.double())  # alpha == rank: scale 1
        cov = covs[name]
        lam, vecs = torch.linalg.eigh((cov + cov.T) / 2)
        tau = threshold_tau(lam, kind, value)
        kept = vecs[:, lam > tau]
        assert float(dw.norm()) > 1e-5, name
        assert float((dw @ kept).norm()) <= 1e-5 * float(dw.norm()), name  # ΔW·V_kept = 0 to float rounding
        weight = unet.get_submodule(name).weight.detach().double()
        error = preservation_error(dw, cov, weight)
        bound = float(torch.sqrt(lam[lam <= tau].max() * dw.norm() ** 2 / torch.einsum("ij,jk,ik->", weight, cov, weight)))
        assert error <= bound * (1 + 1e-3) + 1e-9, name
        assert report["preservation"]["per_layer"][name] == pytest.approx(error, rel=1e-3, abs=1e-9)
    assert set(report["preservation"]["per_timestep"]) == {str(t) for t in manifest.timesteps}


def test_workers_do_not_dump_every_report(global_run):
    # Ray Train logs each report's full metrics at INFO under a logger its LoggingConfig does not reach (issue 10).
    text = worker_logs()
    assert "train (global)" in text  # the training worker's progress bar: these are the right logs
    assert "Reporting training result" not in text


def test_global_training_lowers_the_loss(global_run):
    report = global_run[0]["report"]
    assert len(report["loss_history"]) == 6
    assert report["eval_loss"]["final"] < report["eval_loss"]["initial"]


def test_none_mode_moves_preserved_outputs_ten_times_more(sd_stats, global_run):
    none = train(cfg(sd_stats, SD, "train.name=none", "projection.mode=none"))
    ratio = none["preservation_error"] / global_run[0]["preservation_error"]
    assert ratio >= 10, ratio
    assert none["report"]["eval_loss"]["final"] < none["report"]["eval_loss"]["initial"]


def restored_worker(config, checkpoint_dir) -> Worker:
    """The trained model, rebuilt in this process from a checkpoint (raw parameters + the same projection)."""
    manifest = read_manifest(RunDir(config.run_dir))
    plan = plan_projection(config, manifest, {n: e["in_features"] for n, e in manifest.layers.items()})
    images = stack_images([img for _, img in open_instance_images("demo")], 32)
    worker = Worker(config, plan, images, None, measure=False)
    state = load_training_state(checkpoint_dir)
    worker.signature = state.signature
    worker.restore(state)
    worker.unet.eval()
    return worker


def assert_export_reproduces(config, summary, model):
    """Stock diffusers load_lora_weights + fuse_lora gives the trained UNet's output (with LCM's timestep_cond).

    Later runs in the same run_dir replace run_dir/lora, so the file published by this run (its bytes, kept by
    the fixture) is checked against the final checkpoint's, and diffusers loads that checkpoint's lora folder."""
    exported = Path(summary["checkpoint"]) / "lora"
    assert summary["published"] == (exported / "pytorch_lora_weights.safetensors").read_bytes()
    worker = restored_worker(config, summary["checkpoint"])
    backend = get_backend(config)
    pipe = backend.load_pipeline("cpu")
    pipe.load_lora_weights(str(exported))
    pipe.fuse_lora()
    gen = torch.Generator().manual_seed(5)
    x, text = torch.randn(2, 4, 16, 16, generator=gen), torch.randn(2, 32, 64, generator=gen)
    t = torch.tensor([0, 999])
    with torch.no_grad():
        trained = backend.unet_forward(worker.unet, x, t, text)
        stock = backend.unet_forward(pipe.unet, x, t, text)
        base = backend.unet_forward(base_unet(model), x, t, text)
    assert float((trained - base).abs().max()) > 1e-4
    torch.testing.assert_close(stock, trained, atol=2e-5, rtol=1e-4)


def test_exported_lora_reproduces_the_trained_unet(sd_stats, global_run):
    assert_export_reproduces(cfg(sd_stats, SD, "train.name=global"), global_run[0], "tiny")


# ---------------------------------------------------------------------------------------------------------------
# Distributed training, failures, resume


def test_two_workers_survive_a_failure_stay_identical_and_match_one_worker(sd_stats, global_run):
    """2 workers with the global batch of the 1-worker run; worker 0 fails once at step 5 (after the step-4
    checkpoint) and the group restarts from that checkpoint."""
    config = cfg(sd_stats, SD, "train.name=two", "train.num_workers=2", "train.train_batch_size=1",
                 "train.fail_at_step=5", "train.max_failures=1")
    two = train(config)
    one = global_run[0]["report"]
    assert two["resumed_from"] == [4] and two["steps"] == 6
    assert (Path(sd_stats) / "train" / "two" / ".nullbooth-injected-failure").is_file()
    assert two["report"]["num_workers"] == 2 and two["report"]["global_batch_size"] == one["global_batch_size"] == 2
    assert two["report"]["replica_max_abs_diff"] == 0.0
    assert two["report"]["loss_history"] == pytest.approx(one["loss_history"], rel=1e-4)
    lora_two = lora_tensors(two["lora_dir"])
    for name, (up, down) in global_run[1].items():
        torch.testing.assert_close(lora_two[name][0], up, atol=1e-5, rtol=1e-3)
        torch.testing.assert_close(lora_two[name][1], down, atol=1e-5, rtol=1e-3)

    again = train(config)  # the same name again: already finished, returns without training
    assert again["already_finished"] and again["steps"] == 6 and again["checkpoint"] == two["checkpoint"]
    assert again["elapsed_s"] < two["elapsed_s"]
    assert again["report"] == two["report"]
    with pytest.raises(NullBoothError, match=r"train.name 'two': .* holds a run with another configuration "
                                             r"\(rank: checkpoint has 4, config has 8\)"):
        train(cfg(sd_stats, SD, "train.name=two", "train.num_workers=2", "train.train_batch_size=1", "train.rank=8"))


# ---------------------------------------------------------------------------------------------------------------
# timestep mode, prior preservation, validation grids, unprotected opt-in


def test_timestep_mode_with_prior_preservation_and_unprotected_targets(sd_stats):
    config = cfg(sd_stats, SD, "train.name=timestep", "projection.mode=timestep", "train.with_prior_preservation=true",
                 "train.class_prompt=a photo of a teapot", "train.num_class_images=2",
                 "train.target_modules=[attn2.to_k, attn2.to_v, attn1.to_out.0]", "projection.allow_unprotected=true",
                 "train.validation_prompts=[a photo of sks teapot, a red car]", "train.validation_every=3")
    summary = train(config)
    report = summary["report"]
    assert report["mode"] == "timestep"
    assert len(report["unprotected"]) == 7 and all(n.endswith(".attn1.to_out.0") for n in report["unprotected"])
    assert {n.rsplit(".", 1)[-1] for n in report["protected"]} == {"to_k", "to_v"}
    assert len(report["prior_loss_history"]) == 6 and all(v > 0 for v in report["prior_loss_history"])
    class_dir = Path(sd_stats) / "class_images"
    pngs = sorted(p.name for p in class_dir.glob("class_*.png"))
    assert pngs == ["class_0000.png", "class_0001.png"]
    assert Image.open(class_dir / pngs[0]).size == (32, 32)
    stamps = [p.stat().st_mtime_ns for p in sorted(class_dir.glob("class_*.png"))]
    assert len(ensure_class_images(config)) == 2  # enough are cached: reused, nothing sampled again
    assert [p.stat().st_mtime_ns for p in sorted(class_dir.glob("class_*.png"))] == stamps
    for step in (3, 6):
        grid = Image.open(Path(sd_stats) / "report" / f"validation_step{step:04d}.png")
        assert grid.size == (64, 32)  # one 32x32 tile per validation prompt


# ---------------------------------------------------------------------------------------------------------------
# Errors found before training starts


def test_refuses_mismatched_statistics_and_unprotected_targets(sd_stats, tmp_path):
    with pytest.raises(NullBoothError, match=r"statistics run was made for another model or config.*Differences: "
                                             r"preserve.max_prompts: run has 20, config has 12"):
        train(cfg(sd_stats, SD, "preserve.max_prompts=12"))
    with pytest.raises(NullBoothError, match=r"Differences: .*model.backend: run has 'sd', config has 'lcm'"):
        train(cfg(sd_stats, LCM))
    with pytest.raises(NullBoothError, match=r"train.target_modules: 7 LoRA target\(s\) have no null-space basis"):
        train(cfg(sd_stats, SD, "train.target_modules=[attn1.to_q]"))
    with pytest.raises(NullBoothError, match=r"^train.target_modules: pattern 'attn9.to_q' matches no linear layer "
                                             r"of the UNet \(patterns are suffixes of module paths such as 'attn2.to_q'\)$"):
        train(cfg(sd_stats, SD, "train.target_modules=[attn9.to_q]"))
    with pytest.raises(NullBoothError, match=r"train.resolution: 34 is not a multiple of 4"):
        train(cfg(sd_stats, SD, "train.resolution=34"))
    with pytest.raises(NullBoothError, match=r"covariance/manifest.json does not exist.*nullbooth build-cov"):
        train(cfg(tmp_path / "empty-run", SD))


# ---------------------------------------------------------------------------------------------------------------
# LCM


def test_lcm_global_training_keeps_the_constraint_and_exports(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train-ray-lcm") / "lcm"
    config = cfg(run_dir, LCM, "train.name=lcm", "train.max_train_steps=4")
    build_covariance(config)
    summary = train(config)
    summary["published"] = (Path(summary["lora_dir"]) / "pytorch_lora_weights.safetensors").read_bytes()
    manifest = read_manifest(RunDir(str(run_dir)))
    covs = load_layer_covariances(RunDir(str(run_dir)), manifest, "global")
    for name, (up, down) in lora_tensors(summary["lora_dir"]).items():
        dw = up.double() @ down.double()
        lam, vecs = torch.linalg.eigh(covs[name])
        kept = vecs[:, lam > threshold_tau(lam, "relative", 1e-3)]
        assert float((dw @ kept).norm()) <= 1e-5 * float(dw.norm()), name
    assert summary["report"]["backend"] == "lcm"
    assert summary["report"]["eval_loss"]["final"] < summary["report"]["eval_loss"]["initial"]
    assert_export_reproduces(config, summary, "tiny-lcm")
    assert json.loads((Path(summary["lora_dir"]) / "report.json").read_text())["step"] == 4


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint of other inputs is never returned nor resumed; artifacts are checked on the driver (issue 10)


@pytest.fixture(scope="module")
def stale_stats(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train-stale") / "run"
    build_covariance(cfg(run_dir, SD))
    return run_dir


def leak(lora: dict, bases: dict) -> float:
    """max over layers of ‖ΔW(I − UUᵀ)‖ / ‖ΔW‖: how much of the update leaves the null space."""
    ratios = []
    for name, (up, down) in lora.items():
        dw, u = up.double() @ down.double(), bases[name]
        ratios.append(float((dw - (dw @ u) @ u.T).norm() / dw.norm()))
    return max(ratios)


def differences(message: str) -> list[str]:
    """The keys a refusal names: 'key: checkpoint has ..., config has ...' entries inside its parentheses."""
    import re

    return re.findall(r"(?:\(|; )(\w+): checkpoint has", message)


def test_changed_images_dropout_or_statistics_are_refused_not_returned_as_finished(stale_stats, tmp_path, capsys):
    from nullbooth.cli import main as cli_main
    from nullbooth.models.subject import draw_subject_image
    from nullbooth.stats.store import load_bases

    subject = tmp_path / "subject"
    subject.mkdir()
    for i in range(3):
        draw_subject_image(i, 32).save(subject / f"s{i}.png")
    x = ["train.name=x", "train.max_train_steps=2", f"train.instance_data_dir={subject}"]
    first = train(cfg(stale_stats, SD, *x))
    lora_file = Path(first["lora_dir"]) / "pytorch_lora_weights.safetensors"
    published = lora_file.read_bytes()
    assert not first["already_finished"] and first["steps"] == 2
    assert train(cfg(stale_stats, SD, *x))["already_finished"]

    # The repro: the same folder with other content, and dropout 0.5.
    original = (subject / "s0.png").read_bytes()
    draw_subject_image(9, 32).save(subject / "s0.png")
    with pytest.raises(NullBoothError) as err:
        train(cfg(stale_stats, SD, *x, "train.dropout=0.5"))
    message = str(err.value)
    assert message.startswith(f"train.name 'x': {stale_stats}/train/x holds a run with another configuration (")
    assert message.endswith("); choose another train.name or storage_path, or pass --force to delete this run and "
                            "train afresh")
    assert differences(message) == ["dropout", "instance_images"]
    assert "dropout: checkpoint has 0.0, config has 0.5" in message
    (subject / "s0.png").write_bytes(original)

    # Statistics rebuilt on other prompts: the old LoRA leaks out of the new null spaces, and is not republished.
    rebuilt = cfg(stale_stats, SD, *x, "preserve.max_prompts=12")
    build_covariance(rebuilt, force=True)
    run = RunDir(str(stale_stats))
    bases = load_bases(run, read_manifest(run), "global")
    assert leak(lora_tensors(first["lora_dir"]), bases) > 0.05
    with pytest.raises(NullBoothError) as err:
        train(rebuilt)
    assert differences(str(err.value)) == ["statistics"]
    assert lora_file.read_bytes() == published
    fresh = train(rebuilt, force=True)  # what `nullbooth run --force` does after rebuilding the statistics
    assert not fresh["already_finished"] and fresh["resumed_from"] == [] and fresh["steps"] == 2
    assert leak(lora_tensors(fresh["lora_dir"]), bases) < 1e-5

    # A corrupt checkpoint, through the CLI: one line, exit 2, no traceback.
    sets = sum((["--set", o] for o in [f"run_dir={stale_stats}", *SD, *COMMON, *x, "preserve.max_prompts=12"]), [])
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    checkpoint = Path(fresh["checkpoint"])
    state = (checkpoint / "state.json").read_text()
    for name, data, problem in [
            ("state.json", state[:-30].encode(), "state.json is not valid JSON ("),
            ("trainable.safetensors", b"\x80\x04\x95pickle", "trainable.safetensors does not match the sha256 "
                                                             "recorded in state.json (changed or replaced)")]:
        kept = (checkpoint / name).read_bytes()
        (checkpoint / name).write_bytes(data)
        capsys.readouterr()
        assert cli_main(["train", str(empty), *sets]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"nullbooth: error: train.name 'x': checkpoint {checkpoint}: {problem}")
        assert err.count("\n") == 1 and "Traceback" not in err
        (checkpoint / name).write_bytes(kept)

    # A statistics file replaced by a pickle: refused by the driver, before Ray Train makes the run's folder.
    basis = stale_stats / "projection" / "global.safetensors"
    basis.write_bytes(b"\x80\x04\x95pickle")
    with pytest.raises(NullBoothError, match=rf"^{basis}: its content does not match the sha256 recorded in "):
        train(cfg(stale_stats, SD, "train.name=y", "preserve.max_prompts=12"))
    assert not (stale_stats / "train" / "y").exists()
