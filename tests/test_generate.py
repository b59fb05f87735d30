"""The generation stage on the tiny model: real statistics, PEFT-made LoRAs, Ray Data sampling, the report."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from run_fixtures import make_lora
from safetensors.torch import load_file

from nullbooth.config import load_config
from nullbooth.errors import NullBoothError
from nullbooth.models.backends import get_backend
from nullbooth.report.generate import generate
from nullbooth.report.plan import instance_variants
from nullbooth.report.schema import check_report
from nullbooth.stats.build import build_covariance

BASE = ["sampling.num_inference_steps=2", "preserve.max_prompts=10", "preserve.holdout=2",
        "covariance.num_workers=1", "generate.num_workers=1", "generate.batch_size=8"]


def configure(run_dir: Path, *extra: str):
    return load_config(None, [f"run_dir={run_dir}", *BASE, *extra])


@pytest.fixture(scope="module")
def stats_dir(ray_local, tmp_path_factory):
    """One real statistics run; each test copies it into its own run_dir."""
    run_dir = tmp_path_factory.mktemp("stats")
    build_covariance(configure(run_dir))
    return run_dir


def new_run(stats_dir: Path, tmp_path: Path, b_std: float | None, *extra: str):
    run_dir = tmp_path / "run"
    for part in ("covariance", "projection"):
        shutil.copytree(stats_dir / part, run_dir / part)
    config = configure(run_dir, *extra)
    if b_std is not None:
        make_lora(config.model.path, run_dir / "lora", b_std=b_std)
    return config, run_dir


def load_images(run_dir: Path, files: list[str]) -> list[np.ndarray]:
    out = []
    for rel in files:
        with Image.open(run_dir / rel) as image:
            assert image.format == "PNG" and image.mode == "RGB" and image.size == (32, 32)
            out.append(np.asarray(image))
    return out


def test_zeroed_lora_gives_bit_identical_images_and_zero_drift(stats_dir, tmp_path):
    config, run_dir = new_run(stats_dir, tmp_path, b_std=0.0)
    summary = generate(config)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    check_report(report)
    manifest = json.loads((run_dir / "covariance" / "manifest.json").read_text())
    # Default prompts: the instance-prompt variants, then the held-out preserved prompts of the statistics.
    variants = instance_variants(config.train.instance_prompt)
    assert [p["prompt"] for p in report["prompts"]] == variants + manifest["holdout_prompts"]
    assert len(manifest["holdout_prompts"]) == 2
    assert [p["kind"] for p in report["prompts"]] == ["instance"] * len(variants) + ["holdout"] * 2
    assert [p["seeds"] for p in report["prompts"]] == [[1234 + 1000 * j] for j in range(len(report["prompts"]))]
    latents = load_file(str(run_dir / "samples" / "latents.safetensors"))
    assert torch.equal(latents["base"], latents["finetuned"])
    for entry in report["prompts"]:
        base, tuned = load_images(run_dir, entry["base"]), load_images(run_dir, entry["finetuned"])
        assert all(np.array_equal(b, t) for b, t in zip(base, tuned))
        assert (entry["latent_mse"], entry["pixel_mse"], entry["pixel_psnr_db"]) == (0.0, 0.0, None)
    assert summary["drift"] == {"prompts": 2, "latent_mse": 0.0, "pixel_mse": 0.0, "pixel_psnr_db": None}
    # The base images are the stock pipeline's (an independent computation, one prompt at a time).
    pipe = get_backend(config).load_pipeline("cpu")
    first = report["prompts"][-1]
    stock = pipe(prompt=first["prompt"], generator=torch.Generator().manual_seed(first["seeds"][0]),
                 num_inference_steps=2, guidance_scale=config.sampling.guidance_scale).images[0]
    assert np.abs(np.asarray(stock, dtype=int) - load_images(run_dir, first["base"])[0].astype(int)).max() <= 1
    # The quick single-prompt path agrees: zero drift.
    one = generate(config, prompt="a red bicycle")
    assert one["drift"]["latent_mse"] == 0.0 and one["drift"]["pixel_psnr_db"] is None


def test_nonzero_lora_drifts_on_every_prompt(stats_dir, tmp_path):
    prompts = ["a bowl of ramen on a table", "a photo of sks teapot", "a red bicycle"]
    config, run_dir = new_run(stats_dir, tmp_path, 0.3, f"generate.prompts={json.dumps(prompts)}",
                              "generate.num_images_per_prompt=2", "generate.num_workers=2", "generate.batch_size=3")
    summary = generate(config)
    report = json.loads((run_dir / "report" / "report.json").read_text())
    check_report(report)
    holdout = json.loads((run_dir / "covariance" / "manifest.json").read_text())["holdout_prompts"]
    kinds = ["holdout" if p in holdout else "instance" if p == config.train.instance_prompt else "custom"
             for p in prompts]
    assert [(p["prompt"], p["kind"]) for p in report["prompts"]] == list(zip(prompts, kinds))
    assert [p["seeds"] for p in report["prompts"]] == [[1234, 1235], [2234, 2235], [3234, 3235]]
    latents = load_file(str(run_dir / "samples" / "latents.safetensors"))
    assert latents["base"].shape == (6, 4, 16, 16)
    for r, entry in enumerate(report["prompts"]):
        assert entry["latent_mse"] > 0 and entry["pixel_mse"] > 0 and entry["pixel_psnr_db"] < 60
        rows = slice(2 * r, 2 * r + 2)
        expected = ((latents["finetuned"][rows].double() - latents["base"][rows].double()) ** 2).mean().item()
        assert entry["latent_mse"] == pytest.approx(expected, rel=1e-9)
    assert (summary["drift"] is None) == ("holdout" not in kinds)
    # --prompt: one side-by-side image (base | fine-tuned), seeds as for the first prompt of a batch.
    one = generate(config, prompt="a red bicycle")
    assert one["seeds"] == [1234, 1235] and one["drift"]["latent_mse"] > 0
    with Image.open(one["image"]) as image:
        assert image.format == "PNG" and image.width >= 4 * 128 and image.height >= 128
    assert Path(one["image"]) == run_dir / "samples" / "prompt" / "a-red-bicycle-1234.png"


def test_run_without_lora_is_refused(tmp_path):
    config = configure(tmp_path / "empty")
    with pytest.raises(NullBoothError) as err:
        generate(config)
    lora = tmp_path / "empty" / "lora" / "pytorch_lora_weights.safetensors"
    assert str(err.value) == (f"{lora} does not exist: {tmp_path / 'empty'} has no trained LoRA "
                              "(run `nullbooth train CONFIG` first)")
    with pytest.raises(NullBoothError):
        generate(config, prompt="a red bicycle")


def test_empty_prompt_list_is_refused(stats_dir, tmp_path):
    config, _ = new_run(stats_dir, tmp_path, 0.0, "generate.prompts=[]")
    with pytest.raises(NullBoothError) as err:
        generate(config)
    assert str(err.value) == ("generate.prompts: the list is empty; give at least one prompt, or leave "
                              "generate.prompts unset for the instance-prompt variants and the held-out prompts")
    with pytest.raises(NullBoothError) as err:
        generate(config, prompt="  ")
    assert str(err.value) == "--prompt: the prompt is empty"


# -- what generate checks before it samples (issue 10, items 3 and 7) ------------------------------------------------
@pytest.fixture
def no_sampling(monkeypatch):
    """Sampling (and, with `no_ray=True` via the returned setter, Ray itself) must not be reached."""
    import nullbooth.cluster
    import nullbooth.report.generate as generate_module

    def sampled(*args, **kwargs):
        raise AssertionError("generate sampled before refusing")

    monkeypatch.setattr(generate_module, "sample_pairs", sampled)
    monkeypatch.setattr(generate_module, "generate_one", sampled)

    def forbid_ray():
        def started(*args, **kwargs):
            raise AssertionError("generate started Ray before refusing")
        monkeypatch.setattr(nullbooth.cluster, "connect", started)
    return forbid_ray


def refusal(config, capsys) -> str:
    """The one stderr line of `nullbooth generate` with this config (exit status 2, no traceback)."""
    from nullbooth.cli import guarded

    assert guarded(lambda: generate(config)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("nullbooth: error: ")
    return err[len("nullbooth: error: "):].rstrip("\n")


def test_an_lcm_config_over_an_sd_run_is_refused_before_ray(stats_dir, tmp_path, no_sampling, capsys):
    """The issue's case: an LCM config on a run made with SD and DDIM used to sample and write a report claiming
    lcm/tiny-lcm beside the SD run's numbers."""
    _, run_dir = new_run(stats_dir, tmp_path, 0.0)
    config = configure(run_dir, "model.backend=lcm", "model.path=tiny-lcm", "sampling.scheduler=lcm")
    no_sampling()
    line = refusal(config, capsys)
    assert line.startswith(f"{run_dir}/covariance/manifest.json: the statistics were made with another model or "
                           "config than this one; generate with the run's own config, or use another run_dir. "
                           "Differences: ")
    for diff in ("model.path: run has 'tiny', config has 'tiny-lcm'",
                 "sampling.scheduler: run has 'ddim', config has 'lcm'",
                 "model.backend: run has 'sd', config has 'lcm'"):
        assert diff in line
    with pytest.raises(NullBoothError) as err:
        generate(config, prompt="a red bicycle")
    assert str(err.value) == line
    assert sorted(p.name for p in run_dir.iterdir()) == ["covariance", "lora", "projection"]


def test_a_lora_trained_for_another_config_or_model_is_refused(stats_dir, tmp_path, no_sampling, capsys):
    config, run_dir = new_run(stats_dir, tmp_path, 0.0)
    report = {"step": 2, "mode": "none", "backend": "sd", "model": "tiny", "signature": {"fingerprint": "0" * 16}}
    (run_dir / "lora" / "report.json").write_text(json.dumps(report))
    assert refusal(config, capsys) == (
        f"{run_dir}/lora/report.json: the LoRA was trained with another model or config than this one; generate "
        "with the run's own config, or train again. Differences: projection.mode: the LoRA has 'none', config has "
        "'global'")
    # The mode agrees now, but the LoRA was trained on another UNet: found by reading the model (a Ray task).
    (run_dir / "lora" / "report.json").write_text(json.dumps({**report, "mode": "global"}))
    from nullbooth.models.backends import model_fingerprint

    fingerprint = model_fingerprint(get_backend(config).load_pipeline("cpu").unet)
    assert refusal(config, capsys) == (
        f"{run_dir}/lora/report.json: made on UNet 0000000000000000, but the UNet of 'tiny' is {fingerprint} "
        "(different weights or architecture); generate with the run's own model, or use another run_dir")


def test_statistics_made_on_another_unet_are_refused(stats_dir, tmp_path, no_sampling, capsys):
    config, run_dir = new_run(stats_dir, tmp_path, 0.0)
    path = run_dir / "covariance" / "manifest.json"
    manifest = json.loads(path.read_text())
    recorded = manifest["model"]["fingerprint"]
    manifest["model"]["fingerprint"] = "0123456789abcdef"
    path.write_text(json.dumps(manifest))
    assert refusal(config, capsys) == (
        f"{path}: made on UNet 0123456789abcdef, but the UNet of 'tiny' is {recorded} (different weights or "
        "architecture); generate with the run's own model, or use another run_dir")


def test_a_corrupt_lora_file_is_one_clean_line_before_ray(stats_dir, tmp_path, no_sampling, capsys):
    """It used to fail inside the sampling actors: exit 1 and a raw traceback."""
    config, run_dir = new_run(stats_dir, tmp_path, 0.0)
    weights = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    no_sampling()
    line = refusal(config, capsys)
    assert line.startswith(f"{weights} is not a valid safetensors file (")
    with pytest.raises(NullBoothError) as err:
        generate(config, prompt="a red bicycle")
    assert str(err.value) == line
    # Well-formed safetensors, but not LoRA weights.
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(2, 2)}, str(weights))
    assert refusal(config, capsys) == (f"{weights}: 'weight' is not a UNet LoRA weight in diffusers format "
                                       "(unet.<layer>.lora.down.weight and unet.<layer>.lora.up.weight, 2-D)")


def test_a_lora_for_another_model_is_refused_naming_the_layer(stats_dir, tmp_path, no_sampling, capsys):
    config, run_dir = new_run(stats_dir, tmp_path, None)
    make_lora("toy", run_dir / "lora", b_std=0.1)  # the toy model's cross-attention is 128 wide, tiny's 64
    line = refusal(config, capsys)
    weights = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    assert line == (f"{weights}: LoRA layer 'down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k' maps "
                    "128→64 features, the UNet of 'tiny' maps 64→32 there (a LoRA for another model)")


def test_the_published_lora_carries_its_digest_and_a_changed_file_is_refused(stats_dir, tmp_path, no_sampling,
                                                                              capsys):
    """train's publish records the weights' sha256 in lora/report.json; generate checks it before loading."""
    import hashlib

    from nullbooth.report.checks import check_run
    from nullbooth.storage import RunDir
    from nullbooth.train.export import publish

    config, run_dir = new_run(stats_dir, tmp_path, None)
    checkpoint = tmp_path / "checkpoint"
    make_lora(config.model.path, checkpoint / "lora", b_std=0.1)
    trained = {"step": 2, "mode": "global", "backend": "sd", "model": "tiny", "loss_history": [0.5, float("nan")]}
    (checkpoint / "report.json").write_text(json.dumps(trained))
    publish(RunDir(str(run_dir)), checkpoint)
    weights = run_dir / "lora" / "pytorch_lora_weights.safetensors"
    published = json.loads((run_dir / "lora" / "report.json").read_text())
    assert published["files"] == {"pytorch_lora_weights.safetensors": hashlib.sha256(weights.read_bytes()).hexdigest()}
    assert {k: v for k, v in published.items() if k not in ("files", "loss_history")} == \
        {k: v for k, v in trained.items() if k != "loss_history"}
    facts = check_run(config, RunDir(str(run_dir)), {"lora": "global"})  # intact: accepted
    assert facts.layers and all(".attn2.to_" in name for name in facts.layers)
    make_lora(config.model.path, tmp_path / "other", b_std=0.1, seed=5)
    weights.write_bytes((tmp_path / "other" / "pytorch_lora_weights.safetensors").read_bytes())
    no_sampling()
    assert refusal(config, capsys) == (f"{weights}: its content does not match the sha256 recorded in "
                                       f"{run_dir}/lora/report.json (the file changed after training published it); "
                                       "train again")
