"""report.md: a short page over report.json, linking the grid, the plots and the samples (paths relative to it)."""

from __future__ import annotations

from typing import Any

from nullbooth.formatting import number
from nullbooth.report.plots import short_layer


def _has_plain(report: dict[str, Any]) -> bool:
    return bool(report["prompts"]) and report["prompts"][0]["plain"] is not None


def _percent(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _adapter_word(report: dict[str, Any]) -> str:
    """What was trained (`train.adapter`): a LoRA, or the protected linears' weights themselves."""
    return "LoRA" if report["adapter"] == "lora" else "full fine-tune"


def _scale_word(report: dict[str, Any]) -> str:
    """`generate.lora_scale` scales a LoRA's update, and a full fine-tune's update W - W0 alike."""
    return "LoRA scale" if report["adapter"] == "lora" else "update scale"


def _comparison(report: dict[str, Any]) -> list[str]:
    """Base, fine-tuned and plain LoRA side by side: what the probe reads, drift, preservation error."""
    probe, baseline, plain = report["probe"], report["baseline"], _has_plain(report)
    if probe is None and not plain:
        return []
    models = ["base", "finetuned"] + (["plain"] if plain else [])
    titles = {"base": "base", "finetuned": f"fine-tuned ({report['projection_mode']})",
              "plain": f"plain {_adapter_word(report)} (none)"}
    lines = ["## Side by side", "", "| | " + " | ".join(titles[m] for m in models) + " |",
             "|---|" + "---:|" * len(models)]
    rows = [("concept accuracy, held-out prompts (object and colour right)", "concept_accuracy"),
            ("subject fidelity, instance prompts (recognised as the subject)", "subject_fidelity"),
            ("class prompt drawn as the subject (language drift)", "class_as_subject")]
    for title, key in rows:
        shares = (probe or {}).get(key)
        if shares is not None:
            lines.append(f"| {title}, {shares['images']} images | "
                         + " | ".join(_percent(shares[m]) for m in models) + " |")
    drift = [report["drift"]["holdout"], (baseline or {}).get("drift_holdout") if plain else None]
    lines.append("| held-out drift from base, latent MSE | 0 | "
                 + " | ".join(number(d["latent_mse"]) if d else "–" for d in drift[:len(models) - 1]) + " |")
    errors = [(report["preservation"] or {}).get("overall"), (baseline or {}).get("preservation_overall")]
    at = "" if report["lora_scale"] == 1 else f", at {_scale_word(report)} 1"
    lines.append(f"| preservation error (overall{at}) | 0 | "
                 + " | ".join(number(e) for e in errors[:len(models) - 1]) + " |")
    if probe is not None:
        lines += ["", probe["definition"]]
    return lines + [""]


def _psnr(value: float | None) -> str:
    return "∞ (identical)" if value is None else f"{value:.2f}"


def _plot(files: dict[str, Any], name: str, caption: str) -> list[str]:
    """The Markdown lines showing plot `name`, or none when the report has no such plot."""
    return [f"![{caption}]({_rel(files['plots'][name])})", ""] if name in files["plots"] else []


def _rel(path: str) -> str:
    """A run-relative path as seen from report/report.md."""
    return path[len("report/"):] if path.startswith("report/") else f"../{path}"


def render_markdown(report: dict[str, Any], evaluation: dict[str, Any] | None = None,
                    attention: dict[str, Any] | None = None) -> str:
    """The page; with `evaluation` (report/eval.json, `nullbooth eval`) it has a feature-space section too, with
    `attention` (report/attention/attention.json) the subject-token attention grids."""
    s, files = report["sampling"], report["files"]
    lines = [f"# NullBooth report: `{report['run_dir']}`", "",
             f"Model `{report['model']['path']}` ({report['model']['backend']}), sampler `{s['scheduler']}`, "
             f"{s['num_inference_steps']} steps, guidance {s['guidance_scale']:g}, {s['width']}×{s['height']} px; "
             f"projection mode **{report['projection_mode']}**, {_adapter_word(report)}, "
             f"{_scale_word(report)} {report['lora_scale']:g}; "
             f"seeds: {s['seed_rule']}. Numbers: [report.json](report.json). Created {report['created']}.", "",
             "## Samples", "",
             "Rows are prompts (orange bar: instance-prompt variants, pink: the class prompt, green: held-out "
             "preserved prompts), columns the base model and the fine-tuned model"
             + (f" and the plain {_adapter_word(report)}" if _has_plain(report) else "") + " with the same seed.", "",
             f"![base vs fine-tuned]({_rel(files['grid'])})", ""]
    lines += _comparison(report)
    lines += _attention(attention)
    lines += _drift(report)
    lines += _preservation(report)
    lines += _null_space(report)
    if evaluation is not None:
        lines += ["## Feature-space evaluation (`nullbooth eval`)", "", *evaluation_lines(evaluation), ""]
    lines += ["## Files", "",
              "- images: [`samples/base/`](../samples/base/), [`samples/finetuned/`](../samples/finetuned/)",
              f"- final latents (before VAE decode): [`{files['latents']}`]({_rel(files['latents'])})",
              *[f"- plot `{name}`: [{path}]({_rel(path)})" for name, path in files["plots"].items()], ""]
    return "\n".join(lines)


def _attention(section: dict[str, Any] | None) -> list[str]:
    """The subject-token attention grids and each word's attention share per model (report/attention.py)."""
    if not section:
        return []
    models = section["models"]
    lines = ["## Subject-token attention", "", section["definition"], "",
             "Rows: " + ", ".join(models.values()) + "; columns: the image, then each word at each attn2 resolution. "
             "A column shares one colour scale (0 to its largest value). Every map per timestep: "
             f"[`{section['maps']}`]({_rel(section['maps'])}).", "",
             "| prompt | word (token positions) | " + " | ".join(f"share, {m}" for m in models.values()) + " |",
             "|---|---|" + "---:|" * len(models)]
    for p in section["prompts"]:
        for word, positions in p["positions"].items():
            lines.append(f"| {p['prompt']} | {word} ({', '.join(map(str, positions))}) | "
                         + " | ".join(_percent(p["share"][m][word]) for m in models) + " |")
    lines.append("")
    for p in section["prompts"]:
        lines += [f"![attention maps: {p['prompt']}]({_rel(p['grid'])})", ""]
    return lines


def _drift(report: dict[str, Any]) -> list[str]:
    drift, files = report["drift"], report["files"]
    lines = ["## Image-level drift", "", drift["definition"], "",
             "| prompt | kind | latent MSE | pixel PSNR (dB) |", "|---|---|---:|---:|"]
    for p in report["prompts"]:
        lines.append(f"| {p['prompt']} | {p['kind']} | {p['latent_mse']:.4g} | {_psnr(p['pixel_psnr_db'])} |")
    for kind in ("holdout", "instance"):
        mean = drift[kind]
        if mean is not None:
            lines.append(f"| **mean over {mean['prompts']} {kind} prompts** | | **{mean['latent_mse']:.4g}** | "
                         f"**{_psnr(mean['pixel_psnr_db'])}** |")
    baseline = report["baseline"]
    if baseline and baseline["drift_holdout"]:
        b = baseline["drift_holdout"]
        lines.append(f"| baseline `{baseline['run_dir']}` ({baseline['mode']}), held-out mean | | {b['latent_mse']:.4g} "
                     f"| {_psnr(b['pixel_psnr_db'])} |")
    lines += ["", "Held-out preserved prompts should barely move (small latent MSE, high PSNR); the instance prompts "
              "should move (the subject appears).", ""]
    return lines + _plot(files, "drift", "drift per prompt")


def _preservation(report: dict[str, Any]) -> list[str]:
    p, files = report["preservation"], report["files"]
    lines = ["## Layer-level preservation error (training)", ""]
    if p is None:
        return lines + ["The run has no `lora/report.json` from training: no layer-level preservation errors.", ""]
    lines += ["Per protected layer `sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))` on the preserved keys (0: the layer's output "
              "on preserved prompts does not move).", "",
              f"- mode: {p['mode'] or 'not recorded'}; overall (RMS over layers): **{number(p['overall'])}**; "
              f"largest layer: {number(p['max'])}",
              f"- unprotected LoRA targets: {', '.join(p['unprotected']) or 'none'}"]
    lines += _scale_note(report["lora_scale"], p["overall"])
    baseline = report["baseline"]
    if baseline:
        lines.append(f"- baseline `{baseline['run_dir']}` ({baseline['mode']}): overall "
                     f"{number(baseline['preservation_overall'])}")
    worst = sorted(((v, k) for k, v in p["per_layer"].items() if v is not None), reverse=True)[:8]
    if worst:
        lines += ["", "| layer (largest errors) | error |", "|---|---:|"]
        lines += [f"| `{short_layer(k)}` | {v:.4g} |" for v, k in worst]
    return lines + [""] + _plot(files, "preservation", "preservation error per timestep")


def _scale_note(scale: float, overall: float | None) -> list[str]:
    """Training measures the error of the LoRA as trained (scale 1); the images may use another generate.lora_scale,
    which multiplies ΔW and therefore every error by the same factor."""
    if scale == 1:
        return []
    scaled = f" (overall {number(scale * overall)} at scale {scale:g})" if overall is not None else ""
    return [f"- measured at LoRA scale 1, as trained; these images were sampled at LoRA scale {scale:g}, which "
            f"scales ΔW and so every error here by {scale:g}{scaled}"]


def _null_space(report: dict[str, Any]) -> list[str]:
    ns, files = report["null_space"], report["files"]
    lines = ["## Null space", ""]
    if ns is None:
        return lines + ["The run has no statistics (`covariance/manifest.json`): no null-space dimensions.", ""]
    lines += [f"Threshold {ns['threshold']['kind']} = {ns['threshold']['value']:g}; timesteps {ns['timesteps']}. "
              "k = null-space dimension (directions the LoRA may use), d = layer input width.", "",
              "| layer | d | k (global) | k per timestep (min..max) | τ (global) |", "|---|---:|---:|---:|---:|"]
    if ns["text"] is not None:
        t = ns["text"]
        lines.append(f"| text keys ({len(t['layers'])} layers: to_k, to_v) | {t['in_features']} | {t['dim']} | "
                     f"{t['dim']} (timestep-independent) | {number(t['tau'])} |")
    for name, e in ns["layers"].items():
        per_t = list(e["per_timestep"].values())
        span = f"{min(per_t)}..{max(per_t)}" if per_t else "–"
        lines.append(f"| `{short_layer(name)}` | {e['in_features']} | {e['global']} | {span} | {number(e['tau'])} |")
    lines.append("")
    for name, caption in (("spectrum", "eigenvalue spectra with τ"), ("null_dims", "null-space dimension per layer "
                                                                                    "and timestep")):
        lines += _plot(files, name, caption)
    return lines


_EVAL_COLUMNS = (("fd", "FD"), ("mmd2", "MMD²"), ("precision", "precision"), ("recall", "recall"),
                 ("density", "density"), ("coverage", "coverage"), ("one_nn_accuracy", "1-NNA"))
_EVAL_ROWS = {"reference": "base, other seeds (no change)", "finetuned": "fine-tuned", "plain": "plain LoRA (none)"}


def evaluation_lines(evaluation: dict[str, Any], plot: bool = True) -> list[str]:
    """The evaluation's tables: pooled drift from the base model per extractor, then subject fidelity."""
    s = evaluation["settings"]
    held = evaluation["held_out_prompts"]
    lines = [f"{len(held)} held-out prompts × {s['images_per_prompt']} images per model; subject fidelity on "
             f"{len(evaluation['instance_prompts'])} instance-prompt variants × {s['subject_images']} images "
             f"against {evaluation['instance_images']} instance images. Numbers: [eval.json](eval.json).", ""]
    for name, drift in evaluation["drift"].items():
        lines += [f"Drift from the base model, pooled over the prompts, `{name}` features "
                  f"({s['extractors'][name]}, d = {drift['dim']}):", "",
                  "| compared with base | " + " | ".join(t for _, t in _EVAL_COLUMNS) + " |",
                  "|---|" + "---:|" * len(_EVAL_COLUMNS)]
        for model, row in drift["pooled"].items():
            lines.append(f"| {_EVAL_ROWS[model]} | " + " | ".join(number(row[k]) for k, _ in _EVAL_COLUMNS) + " |")
        lines.append("")
    models = [m for m in ("base", "finetuned", "plain") if m in next(iter(evaluation["fidelity"].values()))]
    lines += ["Subject fidelity (mean cosine similarity):", "",
              "| score | " + " | ".join(models) + " |", "|---|" + "---:|" * len(models)]
    for name, fid in evaluation["fidelity"].items():
        lines.append(f"| {fid['image_score']} | " + " | ".join(number(fid[m]["image"]) for m in models) + " |")
        if fid["text_score"]:
            lines.append(f"| {fid['text_score']} | " + " | ".join(number(fid[m]["text"]) for m in models) + " |")
    lines += ["", evaluation["definition"]]
    if plot:
        lines += ["", f"![feature-space drift per prompt]({_rel(evaluation['files']['plot'])})"]
    return lines
