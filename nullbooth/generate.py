"""Stage 3: base and fine-tuned samples of the same prompts, with the same sampler, steps, guidance and seeds.

    prompts   generate.prompts, or by default the instance-prompt variants (does the subject show up?) followed by
              the held-out preserved prompts (the statistics never saw them: does the rest of the model stay put?)
    seeds     image i of prompt j uses generate.seed + 1000·j + i, for the base and the fine-tuned model alike
    sampling  one Ray Data actor pool (nullbooth.sampler), each actor holding one pipeline with the run's LoRA
              loaded by stock diffusers `load_lora_weights`; every batch is sampled with the LoRA switched off
              (base) and on (fine-tuned), so both see identical batches
    output    run_dir/samples/{base,finetuned}/NN-<prompt>-I.png, run_dir/samples/latents.safetensors,
              then the report (nullbooth.report.write_report) under run_dir/report/

`generate(config, prompt="...")` samples one prompt in-process (no actor pool) and writes one side-by-side image.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import torch

from nullbooth.config import Config, with_absolute_paths
from nullbooth.errors import NullBoothError
from nullbooth.plots import image_grid, png_bytes
from nullbooth.sampler import LORA_FILE, sample_images
from nullbooth.storage import RunDir

LORA_DIR = "lora"
SAMPLES = "samples"
LATENTS = f"{SAMPLES}/latents.safetensors"
SEED_STRIDE = 1000  # seed of image i of prompt j: generate.seed + SEED_STRIDE·j + i


# ---------------------------------------------------------------------------------------------------------------
# Prompts and seeds


def instance_variants(instance_prompt: str) -> list[str]:
    """The instance prompt and three recontextualisations of its subject (as in the DreamBooth paper)."""
    prompt = instance_prompt.strip()
    subject = re.sub(r"^(a|an)\s+(photo|picture|image|photograph)\s+of\s+(a\s+|an\s+|the\s+)?", "", prompt,
                     flags=re.IGNORECASE)
    variants = [prompt, f"{prompt} on a beach", f"{prompt} in the snow", f"a painting of {subject}"]
    return list(dict.fromkeys(variants))


def holdout_prompts(config: Config, run: RunDir) -> list[str]:
    """The preserved prompts the statistics held out: the manifest's list, or the config's rule without one."""
    from nullbooth.stats.store import has_manifest, preserved_prompts, read_manifest

    if has_manifest(run):
        return list(read_manifest(run)["holdout_prompts"])
    return preserved_prompts(config)[1]


def plan_prompts(config: Config, run: RunDir) -> list[tuple[str, str]]:
    """[(prompt, kind)] with kind 'instance', 'holdout' (drift is measured on these) or 'custom'."""
    held = holdout_prompts(config, run)
    variants = instance_variants(config.train.instance_prompt)
    if config.generate.prompts is None:
        return [(p, "instance") for p in variants] + [(p, "holdout") for p in held if p not in variants]
    if not config.generate.prompts:
        raise NullBoothError("generate.prompts: the list is empty; give at least one prompt, or leave "
                             "generate.prompts unset for the instance-prompt variants and the held-out prompts")
    for i, prompt in enumerate(config.generate.prompts):
        if not prompt.strip():
            raise NullBoothError(f"generate.prompts[{i}]: the prompt is empty")
    held_set = set(held)
    return [(p, "holdout" if p in held_set else "instance" if p in variants else "custom")
            for p in config.generate.prompts]


def seeds_for(config: Config, prompt_index: int) -> list[int]:
    return [config.generate.seed + SEED_STRIDE * prompt_index + i for i in range(config.generate.num_images_per_prompt)]


def slug(prompt: str, limit: int = 40) -> str:
    """A file-name-safe form of a prompt."""
    text = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")
    return text[:limit].rstrip("-") or "prompt"


def require_lora(run: RunDir) -> str:
    """The run's LoRA folder; a NullBoothError when it holds no trained LoRA."""
    rel = f"{LORA_DIR}/{LORA_FILE}"
    if not run.exists(rel):
        raise NullBoothError(f"{run.uri(rel)} does not exist: {run.uri()} has no trained LoRA "
                             "(run `nullbooth train CONFIG` first)")
    return run.uri(LORA_DIR)


# ---------------------------------------------------------------------------------------------------------------
# The stage


def generate(config: Config, prompt: str | None = None) -> dict[str, Any]:
    """Sample base and fine-tuned images and write the report. Returns the report's summary (paths and drift).

    With `prompt`, samples only that prompt in-process and returns {"prompt", "seeds", "image", "drift"}.
    """
    config = with_absolute_paths(config)  # actors run elsewhere than the driver's cwd
    run = RunDir(config.run_dir)
    lora_dir = require_lora(run)
    if prompt is not None:
        return generate_one(config, run, lora_dir, prompt)
    from nullbooth.cluster import connect
    from nullbooth.report import read_baseline, write_report

    plan = plan_prompts(config, run)
    baseline = read_baseline(config)  # a wrong baseline_run fails now, not after sampling
    connect(config.ray)
    samples = sample_pairs(config, lora_dir, plan)
    write_samples(run, samples)
    summary = write_report(config, run, samples, baseline)
    print(f"nullbooth generate: {len(samples)} prompts, base and fine-tuned\n"
          f"  grid:   {summary['grid']}\n  report: {summary['report']}\n  page:   {summary['report_md']}")
    return summary


def sample_pairs(config: Config, lora_dir: str, plan: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Base and fine-tuned samples of every planned prompt from one actor pool, grouped per prompt."""
    rows = [(j, prompt, seed) for j, (prompt, _) in enumerate(plan) for seed in seeds_for(config, j)]
    prompts = [p for _, p, _ in rows]
    seeds = [s for _, _, s in rows]
    g = config.generate
    results = sample_images(config, prompts, seeds, lora_dir=lora_dir, lora_scale=g.lora_scale,
                            num_workers=g.num_workers, batch_size=g.batch_size, with_base=True)
    samples = [{"prompt": prompt, "kind": kind, "seeds": [], "base": [], "finetuned": [], "base_latent": [],
                "finetuned_latent": []} for prompt, kind in plan]
    for (j, _, seed), result in zip(rows, results):
        entry = samples[j]
        entry["seeds"].append(seed)
        entry["base"].append(result["base_image"])
        entry["finetuned"].append(result["image"])
        entry["base_latent"].append(result["base_latent"])
        entry["finetuned_latent"].append(result["latent"])
    return samples


def write_samples(run: RunDir, samples: list[dict[str, Any]]) -> None:
    """Every image as a PNG (its run-relative path is added to the entry) and all final latents as safetensors."""
    for j, entry in enumerate(samples):
        for which in ("base", "finetuned"):
            files = []
            for seed, image in zip(entry["seeds"], entry[which]):
                rel = f"{SAMPLES}/{which}/{j:02d}-{slug(entry['prompt'])}-{seed}.png"
                run.write_bytes(rel, png_bytes(image))
                files.append(rel)
            entry[f"{which}_files"] = files
    latents = {which: torch.from_numpy(np.stack([lat for e in samples for lat in e[f"{which}_latent"]]))
               for which in ("base", "finetuned")}
    index = [{"prompt": e["prompt"], "seed": s} for e in samples for s in e["seeds"]]
    run.write_tensors(LATENTS, latents, metadata={"rows": json.dumps(index)})


def generate_one(config: Config, run: RunDir, lora_dir: str, prompt: str) -> dict[str, Any]:
    """One prompt, in this process: base first, then the same pipeline with the LoRA, side by side."""
    from nullbooth.backends import get_backend
    from nullbooth.report import drift_metrics
    from nullbooth.sampler import apply_lora, sample_batch

    if not prompt.strip():
        raise NullBoothError("--prompt: the prompt is empty")
    backend = get_backend(config)
    pipe = backend.load_pipeline(backend.device())
    seeds = seeds_for(config, 0)
    base_images, base_latents = sample_batch(config, pipe, [prompt] * len(seeds), seeds)
    apply_lora(pipe, lora_dir, config.generate.lora_scale)
    tuned_images, tuned_latents = sample_batch(config, pipe, [prompt] * len(seeds), seeds)
    drift = drift_metrics(list(base_latents), list(tuned_latents), list(base_images), list(tuned_images))
    title = f"{prompt!r}, seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"{prompt!r}, seed {seeds[0]}"
    grid = image_grid([{"prompt": prompt, "kind": "", "base": list(base_images), "finetuned": list(tuned_images)}],
                      title=title)
    rel = f"{SAMPLES}/prompt/{slug(prompt)}-{seeds[0]}.png"
    run.write_bytes(rel, grid)
    psnr = drift["pixel_psnr_db"]
    print(f"nullbooth generate: {run.uri(rel)}\n  drift: latent MSE {drift['latent_mse']:.4g}, pixel PSNR "
          + ("inf (identical)" if psnr is None else f"{psnr:.2f} dB"))
    return {"prompt": prompt, "seeds": seeds, "image": run.uri(rel), "drift": drift}
