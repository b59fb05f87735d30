"""Stage 3, `generate(config)`: base and fine-tuned samples of the same prompts, then the report.

    prompts   report/plan.py: the instance-prompt variants and the held-out preserved prompts, one seed rule
    checks    report/checks.py: the statistics and the LoRA against this config (before Ray starts), then against
              the model (fingerprint, LoRA layer shapes) before any sampling
    sampling  one Ray Data actor pool (nullbooth.models.sampler), each actor holding one pipeline with the run's LoRA
              loaded by stock diffusers `load_lora_weights` (train.adapter full: the merged UNet by stock
              `UNet2DConditionModel.from_pretrained`, swapped in); every batch is sampled with the LoRA switched
              off (base) and on (fine-tuned), so both see identical batches
    output    run_dir/samples/{base,finetuned}/NN-<prompt>-SEED.png, run_dir/samples/latents.safetensors,
              the subject-token attention maps (report/attention.py) under run_dir/report/attention/,
              then the report (report/write.py) under run_dir/report/

`generate(config, prompt="...")` samples one prompt in-process (no actor pool) and writes one side-by-side image.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from nullbooth.config import Config, with_absolute_paths
from nullbooth.errors import NullBoothError
from nullbooth.layout import (
    BASELINE_LORA_DIR,
    LATENTS,
    LORA_DIR,
    sample_file,
    single_prompt_file,
    trained_files,
)
from nullbooth.models.sampler import sample_images
from nullbooth.report.attention import (
    attention_targets,
    map_attention,
    resolve_positions,
)
from nullbooth.report.checks import (
    RunFacts,
    check_model,
    check_run,
    inspect_model,
    model_facts,
)
from nullbooth.report.plan import PromptSamples, plan_prompts, seeds_for, slug
from nullbooth.report.plots import image_grid
from nullbooth.storage import RunDir, png_bytes


def require_lora(run: RunDir, lora_dir: str = LORA_DIR, adapter: str = "lora") -> str:
    """The run's trained folder; a NullBoothError when it holds no trained model of `adapter` (train.adapter: a
    LoRA file, or for full the merged UNet, lora/unet/)."""
    for rel in (f"{lora_dir}/{name}" for name in trained_files(adapter)):
        if not run.exists(rel):
            what = "LoRA" if adapter == "lora" else "fully fine-tuned UNet (train.adapter full)"
            raise NullBoothError(f"{run.uri(rel)} does not exist: {run.uri()} has no trained {what} "
                                 "(run `nullbooth train CONFIG` first)")
    return run.uri(lora_dir)


def generate(config: Config, prompt: str | None = None) -> dict[str, Any]:
    """Sample base and fine-tuned images and write the report. Returns the report's summary (paths and drift).

    With `prompt`, samples only that prompt in-process and returns {"prompt", "seeds", "image", "drift"}.
    """
    config = with_absolute_paths(config)  # actors run elsewhere than the driver's cwd
    run = RunDir(config.run_dir)
    adapter = config.train.adapter
    lora_dir = require_lora(run, LORA_DIR, adapter)
    plain_dir = require_lora(run, BASELINE_LORA_DIR, adapter) if config.train.plain_baseline else None
    loras = {LORA_DIR: config.projection.mode, **({BASELINE_LORA_DIR: "none"} if plain_dir else {})}
    facts = check_run(config, run, loras)  # statistics and LoRA against the config, before Ray starts
    if prompt is not None:
        return generate_one(config, run, lora_dir, prompt, facts)
    from nullbooth.cluster import connect
    from nullbooth.report.write import read_baseline, write_report

    plan = plan_prompts(config, run)
    targets = attention_targets(config, plan)
    resolve_positions(config, targets)  # a word the tokenizer cuts off fails now, before Ray starts
    baseline = read_baseline(config)  # a wrong baseline_run fails now, not after sampling
    connect(config.ray)
    check_model(config, facts, inspect_model(config, facts.layers))  # ... and against the model itself
    samples = sample_pairs(config, lora_dir, plan, plain_dir)
    write_samples(run, samples)
    attention = map_attention(config, run, targets, lora_dir, plain_dir)
    summary = write_report(config, run, samples, baseline, attention)
    summary["prompts"] = len(samples)
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """What `nullbooth generate` prints: where the pictures and the report are (or the one prompt's image)."""
    if "image" in summary:
        psnr = summary["drift"]["pixel_psnr_db"]
        return (f"nullbooth generate: {summary['image']}\n  drift: latent MSE {summary['drift']['latent_mse']:.4g}, "
                "pixel PSNR " + ("inf (identical)" if psnr is None else f"{psnr:.2f} dB"))
    lines = [f"nullbooth generate: {summary['prompts']} prompts, base and fine-tuned",
             f"  grid:   {summary['grid']}", f"  report: {summary['report']}", f"  page:   {summary['report_md']}"]
    if summary.get("attention"):
        lines.append(f"  attention maps: {len(summary['attention'])} grids, e.g. {summary['attention'][0]}")
    for title, key in (("concept accuracy, held-out", "concept_accuracy"), ("subject fidelity", "subject_fidelity")):
        shares = (summary.get("probe") or {}).get(key)
        if shares:
            lines.append(f"  {title}: " + ", ".join(f"{model} {100 * shares[model]:.0f} %"
                                                    for model in ("base", "finetuned", "plain")
                                                    if shares[model] is not None))
    return "\n".join(lines)


def sample_pairs(config: Config, lora_dir: str, plan: list[tuple[str, str]],
                 plain_dir: str | None = None) -> list[PromptSamples]:
    """Base and fine-tuned (and plain-LoRA) samples of every planned prompt from one actor pool, grouped per
    prompt: every actor samples each batch under each model, so all see identical batches and seeds."""
    rows = [(j, prompt, seed) for j, (prompt, kind) in enumerate(plan) for seed in seeds_for(config, j, kind)]
    g = config.generate
    results = sample_images(config, [p for _, p, _ in rows], [s for _, _, s in rows], lora_dir=lora_dir,
                            lora_scale=g.lora_scale, num_workers=g.num_workers, batch_size=g.batch_size,
                            with_base=True, extra_loras={"plain": plain_dir} if plain_dir else None)
    samples = [PromptSamples(prompt, kind) for prompt, kind in plan]
    for (j, _, seed), result in zip(rows, results):
        entry = samples[j]
        entry.seeds.append(seed)
        entry.base.append(result["base_image"])
        entry.finetuned.append(result["image"])
        entry.base_latents.append(result["base_latent"])
        entry.finetuned_latents.append(result["latent"])
        if plain_dir:
            entry.plain.append(result["plain_image"])
            entry.plain_latents.append(result["plain_latent"])
    return samples


def write_samples(run: RunDir, samples: list[PromptSamples]) -> None:
    """Every image as a PNG (its run-relative path is recorded in the entry) and all final latents as safetensors."""
    for j, entry in enumerate(samples):
        for images, files, which in ((entry.base, entry.base_files, "base"),
                                     (entry.finetuned, entry.finetuned_files, "finetuned"),
                                     (entry.plain, entry.plain_files, "plain")):
            files.clear()
            for seed, image in zip(entry.seeds, images):
                rel = sample_file(which, j, slug(entry.prompt), seed)
                run.write_bytes(rel, png_bytes(image))
                files.append(rel)
    latents = {which: torch.from_numpy(np.stack([lat for e in samples for lat in getattr(e, f"{which}_latents")]))
               for which in ("base", "finetuned", "plain") if getattr(samples[0], f"{which}_latents")}
    index = [{"prompt": e.prompt, "seed": s} for e in samples for s in e.seeds]
    run.write_tensors(LATENTS, latents, metadata={"rows": json.dumps(index)})


def generate_one(config: Config, run: RunDir, lora_dir: str, prompt: str, facts: RunFacts) -> dict[str, Any]:
    """One prompt, in this process: base first, then the same pipeline with the LoRA, side by side (the pipeline's
    UNet is checked against the run's `facts` first)."""
    from nullbooth.models.backends import get_backend
    from nullbooth.models.sampler import ADAPTER_NAME, FinetunedModels, sample_batch
    from nullbooth.report.drift import drift_metrics

    if not prompt.strip():
        raise NullBoothError("--prompt: the prompt is empty")
    backend = get_backend(config)
    pipe = backend.load_pipeline(backend.device())
    check_model(config, facts, model_facts(pipe.unet, facts.layers))
    seeds = seeds_for(config, 0)
    base_images, base_latents = sample_batch(config, pipe, [prompt] * len(seeds), seeds)
    FinetunedModels(pipe).add(ADAPTER_NAME, lora_dir, config.generate.lora_scale, select=True)
    tuned_images, tuned_latents = sample_batch(config, pipe, [prompt] * len(seeds), seeds)
    drift = drift_metrics(list(base_latents), list(tuned_latents), list(base_images), list(tuned_images))
    title = f"{prompt!r}, seeds {seeds[0]}..{seeds[-1]}" if len(seeds) > 1 else f"{prompt!r}, seed {seeds[0]}"
    row = PromptSamples(prompt, "", seeds, list(base_images), list(tuned_images))
    rel = single_prompt_file(slug(prompt), seeds[0])
    run.write_bytes(rel, image_grid([row], title=title))
    return {"prompt": prompt, "seeds": seeds, "image": run.uri(rel), "drift": drift}
