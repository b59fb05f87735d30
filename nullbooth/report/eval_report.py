"""report/eval.json: the feature-space metrics of `nullbooth eval`, computed from the extracted features.

    drift      per extractor, for every compared set y (reference = the base model at other seeds, finetuned,
               plain) against the base model's set x: the metrics of report/distances.py per held-out prompt, their
               mean over prompts, and pooled over all prompts' images
    fidelity   per extractor and model (base, finetuned, plain): mean cosine similarity of the instance-prompt
               samples with the instance images (DINO, CLIP-I, probe-I) and, where the extractor has a text tower,
               of each sample with its prompt (CLIP-T)

The file is written through RunDir (temporary name, then rename); report.md gets a section over it.
"""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np

from nullbooth.config import Config
from nullbooth.layout import (
    ATTENTION_JSON,
    EVAL_FEATURES,
    EVAL_JSON,
    LORA_FILE,
    REPORT_JSON,
    REPORT_MD,
    plot_file,
)
from nullbooth.report.distances import KERNEL_DEFINITIONS, drift_scores, mean_cosine
from nullbooth.report.plan import SEED_STRIDE
from nullbooth.storage import RunDir, sha256_hex

FORMAT_VERSION = 1
METRICS = ("fd", "mmd2", "precision", "recall", "density", "coverage", "one_nn_accuracy")
IMAGE_SCORE = {"probe": "probe-I", "clip": "CLIP-I", "dino": "DINO"}
TEXT_SCORE = {"clip": "CLIP-T"}


def definition(config: Config) -> str:
    ev = config.eval
    return ("Distribution drift on held-out preserved prompts, in feature space. x = the base model's "
            f"{ev.images_per_prompt} images of a prompt (seeds 0..N-1 of its range); each compared set y = "
            "N images at the other N seeds: the base model's again (reference: the values when nothing changed, "
            "at this N), the fine-tuned model's, the plain LoRA's. fd: Fréchet distance (FID's formula on these "
            f"features); mmd2: unbiased MMD², kernel {KERNEL_DEFINITIONS[ev.kernel]} (d = feature width); "
            f"precision/recall/density/coverage: k-NN balls with k = {ev.k} (Naeem et al. 2020); one_nn_accuracy: "
            "leave-one-out 1-NN two-sample accuracy (0.5 = indistinguishable, 1 = apart). 'pooled' pools every "
            "prompt's images; 'mean_over_prompts' averages the per-prompt values. Subject fidelity: mean cosine "
            "similarity of the instance-prompt samples' features with the instance images' (DINO, CLIP-I, "
            "probe-I) and with their prompt's text embedding (CLIP-T).")


def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([r[m] for r in rows])) for m in METRICS}


def _drift(config: Config, features: dict[str, np.ndarray], name: str, held: list[str],
           models: list[str]) -> dict[str, Any]:
    n, ev = config.eval.images_per_prompt, config.eval
    x = features[f"{name}/base"]
    per_prompt = []
    for j, prompt in enumerate(held):
        rows = slice(j * n, (j + 1) * n)
        per_prompt.append({"prompt": prompt, **{m: drift_scores(x[rows], features[f"{name}/{m}"][rows], ev.k,
                                                                ev.kernel) for m in models}})
    return {"dim": int(x.shape[1]),
            "pooled": {m: drift_scores(x, features[f"{name}/{m}"], ev.k, ev.kernel) for m in models},
            "mean_over_prompts": {m: _mean_rows([p[m] for p in per_prompt]) for m in models},
            "per_prompt": per_prompt}


def _fidelity(features: dict[str, np.ndarray], name: str, prompt_of_row: np.ndarray,
              models: list[str]) -> dict[str, Any]:
    instance = features[f"{name}/instance"]
    text = features.get(f"{name}/text")
    out: dict[str, Any] = {"image_score": IMAGE_SCORE[name], "text_score": TEXT_SCORE.get(name)}
    for model in models:
        samples = features[f"{name}/subject_{model}"]
        clip_t = None
        if text is not None:
            a = samples / np.linalg.norm(samples, axis=1, keepdims=True).clip(1e-12)
            t = text / np.linalg.norm(text, axis=1, keepdims=True).clip(1e-12)
            clip_t = float((a.astype(np.float64) * t[prompt_of_row].astype(np.float64)).sum(1).mean())
        out[model] = {"image": mean_cosine(samples, instance), "text": clip_t}
    return out


def build_evaluation(config: Config, run: RunDir, plan: list[tuple[str, str, list[int]]],
                     features: dict[str, np.ndarray], plain: bool) -> dict[str, Any]:
    """eval.json's content from the features (keys "<extractor>/<set>", see report/evaluate.py)."""
    held = [p for p, kind, _ in plan if kind == "holdout"]
    variants = [(p, seeds) for p, kind, seeds in plan if kind == "instance"]
    prompt_of_row = np.concatenate([np.full(len(seeds), i) for i, (_, seeds) in enumerate(variants)])
    names = list(dict.fromkeys(key.split("/")[0] for key in features))
    compared = ["reference", "finetuned"] + (["plain"] if plain else [])
    models = ["base", "finetuned"] + (["plain"] if plain else [])
    ev = config.eval
    lora = run.read_bytes(LORA_FILE)
    return {
        "format_version": FORMAT_VERSION, "run_dir": run.uri(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"backend": config.model.backend, "path": config.model.path},
        "projection_mode": config.projection.mode, "lora_scale": config.generate.lora_scale,
        "lora_sha256": sha256_hex(lora),
        "settings": {"images_per_prompt": ev.images_per_prompt, "subject_images": ev.subject_images, "k": ev.k,
                     "kernel": ev.kernel, "kernel_definition": KERNEL_DEFINITIONS[ev.kernel],
                     "seed_rule": f"image i of prompt j: {ev.seed} + {SEED_STRIDE}*j + i; base x = i < "
                                  f"{ev.images_per_prompt}, compared sets = the rest",
                     "extractors": {n: {"probe": f"{config.model.path} probe", "clip": ev.clip_model,
                                        "dino": ev.dino_model}[n] for n in names}},
        "definition": definition(config),
        "held_out_prompts": held,
        "instance_prompts": [p for p, _ in variants],
        "instance_images": int(len(features[f"{names[0]}/instance"])),
        "drift": {n: _drift(config, features, n, held, compared) for n in names},
        "fidelity": {n: _fidelity(features, n, prompt_of_row, models) for n in names},
        "files": {"eval": EVAL_JSON, "features": EVAL_FEATURES, "plot": plot_file("eval")},
    }


def current_evaluation(run: RunDir) -> dict[str, Any] | None:
    """eval.json when the run has one made with its current LoRA (by sha256), else None."""
    if not run.exists(EVAL_JSON) or not run.exists(LORA_FILE):
        return None
    evaluation = run.read_json(EVAL_JSON)
    if not isinstance(evaluation, dict) or evaluation.get("lora_sha256") != sha256_hex(run.read_bytes(LORA_FILE)):
        return None
    return evaluation


def write_evaluation(config: Config, run: RunDir, evaluation: dict[str, Any]) -> dict[str, Any]:
    """The plot, eval.json, and report.md again with the evaluation's section (when the run has a report)."""
    from nullbooth.report.markdown import render_markdown
    from nullbooth.report.plots import eval_plot

    run.write_bytes(evaluation["files"]["plot"], eval_plot(evaluation))
    run.write_json(EVAL_JSON, evaluation)
    page = None
    if run.exists(REPORT_JSON):
        attention = run.read_json(ATTENTION_JSON) if run.exists(ATTENTION_JSON) else None  # keep its section
        run.write_bytes(REPORT_MD, render_markdown(run.read_json(REPORT_JSON), evaluation, attention).encode())
        page = run.uri(REPORT_MD)
    return {"eval": run.uri(EVAL_JSON), "plot": run.uri(evaluation["files"]["plot"]), "report_md": page,
            "evaluation": evaluation}


def format_summary(summary: dict[str, Any]) -> str:
    """What `nullbooth eval` prints: the pooled table per extractor, the fidelity scores, where the files are."""
    from nullbooth.report.markdown import evaluation_lines

    lines = [f"nullbooth eval: {summary['eval']}", *evaluation_lines(summary["evaluation"], plot=False),
             f"plot: {summary['plot']}"]
    if summary["report_md"]:
        lines.append(f"page: {summary['report_md']}")
    return "\n".join(lines)
