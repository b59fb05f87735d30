"""`nullbooth eval CONFIG`: has the fine-tuned model's distribution of images for a held-out prompt moved, and does
it draw the subject? Feature-space metrics over many samples per prompt.

    checks    as `generate` (report/checks.py): the statistics and the LoRA(s) against the config before Ray
              starts, then against the model's UNet before any sampling
    prompts   the first eval.prompts held-out preserved prompts, eval.images_per_prompt images each, and the
              instance-prompt variants, eval.subject_images each
    sampling  the generation stage's Ray Data sampler (models/sampler.py), base and fine-tuned (and the plain-LoRA
              baseline) on identical batches. A held-out prompt is sampled at 2N seeds: the base model's first N
              images are the reference set x; every compared set y is the second N seeds' images — the base
              model's (the no-change reference: what x vs y reads when nothing changed, at this N), the
              fine-tuned model's and the plain LoRA's — so x and y never share a seed
    features  one Ray task loads each extractor (report/extractors.py) and embeds every image (and, for CLIP, the
              prompts)
    metrics   report/distances.py, per prompt and pooled over the prompts; subject fidelity against the instance
              images (train.instance_data_dir)
    output    report/eval.json (report/eval_report.py), report/eval_features.safetensors, report/plots/eval.png,
              and an evaluation section in report/report.md when the run has a report
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import torch

from nullbooth.config import Config, with_absolute_paths
from nullbooth.errors import NullBoothError, user_error
from nullbooth.layout import BASELINE_LORA_DIR, EVAL_FEATURES, LORA_DIR
from nullbooth.report.checks import check_model, check_run, inspect_model
from nullbooth.report.extractors import default_extractors
from nullbooth.report.generate import require_lora
from nullbooth.report.plan import SEED_STRIDE, holdout_prompts, instance_variants
from nullbooth.storage import RunDir

# The sets of one prompt's images. x: "base" (seeds 0..N-1); y: the others (seeds N..2N-1).
COMPARED = ("reference", "finetuned", "plain")


def eval_plan(config: Config, run: RunDir) -> list[tuple[str, str, list[int]]]:
    """[(prompt, kind, seeds)]: the first eval.prompts held-out prompts (2N seeds each), then the instance-prompt
    variants (eval.subject_images seeds each). Seed of image i of prompt j: eval.seed + 1000·j + i."""
    ev = config.eval
    held = holdout_prompts(config, run)[:ev.prompts]
    if not held:
        raise NullBoothError("eval: the run has no held-out preserved prompts to evaluate drift on; set "
                             "preserve.holdout > 0 (and rebuild the statistics)")
    variants = instance_variants(config.train.instance_prompt, config.model.path)
    plan = [(p, "holdout", 2 * ev.images_per_prompt) for p in held]
    plan += [(p, "instance", ev.subject_images) for p in variants if p not in held]
    return [(p, kind, [ev.seed + SEED_STRIDE * j + i for i in range(n)]) for j, (p, kind, n) in enumerate(plan)]


def evaluate(config: Config) -> dict[str, Any]:
    """Sample, embed, measure; write report/eval.json (and the features, the plot, the report's section).
    Returns {"eval": path, "evaluation": the eval.json content}."""
    from nullbooth.cluster import connect
    from nullbooth.report.eval_report import build_evaluation, write_evaluation
    from nullbooth.train.data import open_instance_images

    config = with_absolute_paths(config)
    run = RunDir(config.run_dir)
    lora_dir = require_lora(run)
    plain_dir = require_lora(run, BASELINE_LORA_DIR) if config.train.plain_baseline else None
    facts = check_run(config, run, {LORA_DIR: config.projection.mode,
                                    **({BASELINE_LORA_DIR: "none"} if plain_dir else {})})
    extractors = default_extractors(config)
    if "probe" in extractors:
        from nullbooth.report.extractors import load_extractor

        load_extractor("probe", config)  # refuses a model without a probe now, before Ray starts
    plan = eval_plan(config, run)
    instance = [np.asarray(image) for _, image in open_instance_images(config.train.instance_data_dir,
                                                                       config.model.path)]
    connect(config.ray)
    check_model(config, facts, inspect_model(config, facts.layers))
    images = sample_sets(config, lora_dir, plain_dir, plan)
    images["instance"] = instance
    texts = [p for p, kind, _ in plan if kind == "instance"]
    features = extract(config, extractors, images, texts)
    evaluation = build_evaluation(config, run, plan, features, plain=plain_dir is not None)
    write_features(run, features, plan)
    return write_evaluation(config, run, evaluation)


def sample_sets(config: Config, lora_dir: str, plain_dir: str | None,
                plan: list[tuple[str, str, list[int]]]) -> dict[str, list[np.ndarray]]:
    """Images by set name: "base", "reference", "finetuned", "plain" (held-out prompts, in plan order, N per prompt)
    and "subject_base", "subject_finetuned", "subject_plain" (instance-prompt variants)."""
    from nullbooth.models.sampler import sample_images

    rows = [(p, kind, s) for p, kind, seeds in plan for s in seeds]
    ev = config.eval
    results = sample_images(config, [p for p, _, _ in rows], [s for _, _, s in rows], lora_dir=lora_dir,
                            lora_scale=config.generate.lora_scale, num_workers=ev.num_workers,
                            batch_size=ev.batch_size, with_base=True,
                            extra_loras={"plain": plain_dir} if plain_dir else None)
    sets: dict[str, list[np.ndarray]] = {}
    start = 0
    for _, kind, seeds in plan:
        chunk = results[start:start + len(seeds)]
        start += len(seeds)
        if kind == "holdout":
            half = len(seeds) // 2
            picks = {"base": ("base_image", chunk[:half]), "reference": ("base_image", chunk[half:]),
                     "finetuned": ("image", chunk[half:]), "plain": ("plain_image", chunk[half:])}
        else:
            picks = {"subject_base": ("base_image", chunk), "subject_finetuned": ("image", chunk),
                     "subject_plain": ("plain_image", chunk)}
        for name, (key, part) in picks.items():
            if plain_dir or "plain" not in name:
                sets.setdefault(name, []).extend(r[key] for r in part)
    return sets


def _extract_task(config: Config, names: list[str], images: dict[str, list[np.ndarray]],
                  texts: list[str]) -> dict[str, np.ndarray]:
    from nullbooth.models.backends import get_backend
    from nullbooth.report.extractors import load_extractor

    device = str(get_backend(config).device())
    out: dict[str, np.ndarray] = {}
    for name in names:
        extractor = load_extractor(name, config, device)
        for which, batch in images.items():
            out[f"{name}/{which}"] = extractor.images(batch)
        if extractor.has_text and texts:
            out[f"{name}/text"] = extractor.texts(texts)
    return out


def extract(config: Config, names: list[str], images: dict[str, list[np.ndarray]],
            texts: list[str]) -> dict[str, np.ndarray]:
    """{"<extractor>/<set>": (n, d) features, "<extractor>/text": the instance variants' text embeddings}, from
    one Ray task (a GPU one when the cluster has GPUs and model.device allows)."""
    import ray

    from nullbooth.cluster import cluster_has_gpu

    gpus = 1 if config.model.device != "cpu" and cluster_has_gpu() else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus)(_extract_task)
    try:
        return ray.get(task.remote(config, names, images, texts))
    except ray.exceptions.RayTaskError as err:
        found = user_error(err)
        if found is None:
            raise
        raise found from None


def write_features(run: RunDir, features: dict[str, np.ndarray], plan: list[tuple[str, str, list[int]]]) -> None:
    """report/eval_features.safetensors: every feature matrix eval.json was computed from; the metadata says which
    (prompt, seed) each row of the held-out sets and of the subject sets is."""
    half = {p: len(seeds) // 2 for p, kind, seeds in plan if kind == "holdout"}
    rows = {"base": [{"prompt": p, "seed": s} for p, kind, seeds in plan if kind == "holdout"
                     for s in seeds[:half[p]]],
            "compared": [{"prompt": p, "seed": s} for p, kind, seeds in plan if kind == "holdout"
                         for s in seeds[half[p]:]],
            "subject": [{"prompt": p, "seed": s} for p, kind, seeds in plan if kind == "instance" for s in seeds],
            "text": [p for p, kind, _ in plan if kind == "instance"]}
    tensors = {key: torch.from_numpy(np.array(value, dtype=np.float32)) for key, value in features.items()}  # copies
    run.write_tensors(EVAL_FEATURES, tensors, metadata={"rows": json.dumps(rows)})
