"""train.adapter full end to end on a local Ray: real statistics of the tiny SD model, Ray Train runs of a few steps,
the merged UNet published to run_dir/lora/unet/ and loaded by stock diffusers, an exact resume after an injected
failure, the adapter in the resume signature, and generation with the fine-tuned UNet.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.backends import get_backend
from nullbooth.models.registry import resolve_model_location
from nullbooth.models.sampler import sample_batch
from nullbooth.nullspace import preservation_error, threshold_tau
from nullbooth.stats.build import build_covariance
from nullbooth.stats.manifest import read_manifest
from nullbooth.stats.store import load_layer_covariances
from nullbooth.storage import RunDir
from nullbooth.train.run import train

SD = ["model.backend=sd", "model.path=tiny", "sampling.scheduler=ddim", "sampling.guidance_scale=7.5"]
COMMON = ["preserve.max_prompts=20", "preserve.holdout=4", "sampling.num_inference_steps=2",
          "covariance.num_workers=1", "covariance.batch_size=8", "train.max_train_steps=6", "train.checkpoint_every=2",
          "train.metrics_every=3", "train.train_batch_size=2", "train.learning_rate=1e-3", "generate.num_workers=1",
          "train.adapter=full"]
UNET_FILE = "unet/diffusion_pytorch_model.safetensors"


def cfg(run_dir, *overrides):
    return load_config(None, [f"run_dir={run_dir}", *SD, *COMMON, *overrides])


def unet(location, subfolder="unet"):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(str(location), subfolder=subfolder).eval()


@pytest.fixture(scope="module")
def stats(ray_local, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("train-full-ray") / "sd"
    build_covariance(cfg(run_dir))
    return run_dir


@pytest.fixture(scope="module")
def full_run(stats):
    summary = train(cfg(stats, "train.name=full"))
    summary["published"] = (Path(summary["lora_dir"]) / UNET_FILE).read_bytes()
    return summary


def test_published_unet_loads_with_stock_diffusers_and_keeps_the_constraint(stats, full_run):
    run = RunDir(str(stats))
    manifest = read_manifest(run)
    covs = load_layer_covariances(run, manifest, "global")
    report = full_run["report"]
    assert report["adapter"] == "full" and report["mode"] == "global" and report["step"] == 6
    assert report["rank"] is None and sorted(report["protected"]) == sorted(manifest.layers)
    published = json.loads((Path(full_run["lora_dir"]) / "report.json").read_text())
    assert set(published["files"]) == {"unet/config.json", UNET_FILE}
    assert not (Path(full_run["lora_dir"]) / "pytorch_lora_weights.safetensors").exists()
    assert report["eval_loss"]["final"] < report["eval_loss"]["initial"]
    tuned, base = unet(full_run["lora_dir"]), unet(resolve_model_location("tiny"))
    kind, value = manifest.threshold["kind"], manifest.threshold["value"]
    for name in manifest.layers:
        weight = base.get_submodule(name).weight.detach().double()
        dw = tuned.get_submodule(name).weight.detach().double() - weight
        lam, vecs = torch.linalg.eigh((covs[name] + covs[name].T) / 2)
        kept = vecs[:, lam > threshold_tau(lam, kind, value)]
        assert float(dw.norm()) > 1e-4, name
        # ΔW·V_kept = 0 up to the float32 rounding of the merged weight W₀ + ΔW (the exact, unrounded ΔW is
        # checked to 1e-6 in test_train_full.py)
        assert float((dw @ kept).norm()) <= 1e-4 * float(dw.norm()), name
        error = preservation_error(dw, covs[name], weight)
        assert report["preservation"]["per_layer"][name] == pytest.approx(error, rel=1e-2, abs=1e-7)
    # Only the trained linears differ from the base model.
    changed = {k for k, v in tuned.state_dict().items() if not torch.equal(v, base.state_dict()[k])}
    assert changed == {f"{name}.weight" for name in manifest.layers}


def test_resume_after_a_failure_gives_the_uninterrupted_weights(stats, full_run):
    resumed = train(cfg(stats, "train.name=full-fail", "train.fail_at_step=5", "train.max_failures=1"))
    assert resumed["resumed_from"] == [4] and resumed["steps"] == 6
    assert (Path(stats) / "train" / "full-fail" / ".nullbooth-injected-failure").is_file()
    straight = load_file(str(Path(full_run["checkpoint"]) / "lora" / UNET_FILE))
    again = load_file(str(Path(resumed["checkpoint"]) / "lora" / UNET_FILE))
    assert straight.keys() == again.keys()
    for key, tensor in straight.items():
        assert torch.equal(tensor, again[key]), key
    assert resumed["report"]["loss_history"] == full_run["report"]["loss_history"]


def test_a_lora_run_is_not_resumed_as_full(stats):
    first = train(cfg(stats, "train.name=mixed", "train.adapter=lora", "train.max_train_steps=2"))
    assert first["report"]["adapter"] == "lora"
    with pytest.raises(NullBoothError, match=r"train.name 'mixed': .* holds a run with another configuration \("
                                             r".*adapter: checkpoint has 'lora', config has 'full'"):
        train(cfg(stats, "train.name=mixed", "train.max_train_steps=2"))


def test_generate_samples_the_published_unet(stats, full_run):
    from diffusers import UNet2DConditionModel

    from nullbooth.report.generate import generate

    config = cfg(stats, "train.name=full", "generate.batch_size=8")
    again = train(config)  # finished: re-published over the runs of the other tests
    assert again["already_finished"]
    assert (Path(again["lora_dir"]) / UNET_FILE).read_bytes() == full_run["published"]
    summary = generate(config)
    report = json.loads(Path(summary["report"]).read_text())
    assert report["preservation"]["overall"] == pytest.approx(full_run["preservation_error"], rel=1e-9)
    latents = load_file(str(Path(stats) / "samples" / "latents.safetensors"))
    # Independently: the stock pipeline with the published UNet loaded by from_pretrained, same prompt and seed.
    entry = report["prompts"][0]
    pipe = get_backend(config).load_pipeline("cpu")
    base_images, base_latents = sample_batch(config, pipe, [entry["prompt"]], entry["seeds"][:1])
    pipe.unet = UNet2DConditionModel.from_pretrained(again["lora_dir"], subfolder="unet")
    _, tuned_latents = sample_batch(config, pipe, [entry["prompt"]], entry["seeds"][:1])
    # (a batch of 8 in the actor against a batch of 1 here: float32 rounding differs by ~1e-5)
    torch.testing.assert_close(latents["finetuned"][0], torch.from_numpy(tuned_latents[0]), atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(latents["base"][0], torch.from_numpy(base_latents[0]), atol=1e-4, rtol=1e-3)
    assert float((torch.from_numpy(tuned_latents[0] - base_latents[0])).abs().max()) > 1e-2
    # The attention maps were recorded on the full fine-tune's own UNet: its maps differ from the base model's.
    maps = load_file(str(Path(stats) / "report" / "attention" / "maps.safetensors"))
    tuned = {k.split("/", 1)[1]: v for k, v in maps.items() if k.startswith("finetuned/")}
    assert tuned and any(not torch.equal(v, maps[f"base/{k}"]) for k, v in tuned.items())
