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
