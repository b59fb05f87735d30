"""The run's report: image-level drift, layer-level preservation, null-space dimensions, grids and plots.

Everything goes under `run_dir/report/` (names in nullbooth.layout) through `RunDir` (atomic writes):

    report/report.json           the numbers, in the layout report/schema.py fixes (check_report validates it)
    report/report.md             a short page linking every picture below
    report/grid.png              rows = prompts, columns = base / fine-tuned, labelled
    report/plots/drift.png       per-prompt drift (latent MSE), baseline alongside when given
    report/plots/preservation.png  preservation error per timestep (this run, and the baseline run)
    report/plots/spectrum.png    eigenvalue spectrum per protected layer (global covariance), τ marked
    report/plots/null_dims.png   null-space dimension per layer and timestep

Sources: the samples (report/generate.py), `lora/report.json` from training (optional: null when absent) and
`covariance/manifest.json` + `projection/*.safetensors` from the statistics (optional likewise).
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import numpy as np

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import (
    BASELINE_LORA_DIR,
    GRID,
    LATENTS,
    LORA_DIR,
    REPORT_JSON,
    REPORT_MD,
    REPORT_NAME,
    TRAIN_REPORT,
    plot_file,
)
from nullbooth.nullspace import threshold_tau
from nullbooth.report.drift import DRIFT_DEFINITION, drift_metrics, mean_drift
from nullbooth.report.plan import PromptSamples, seed_rule
from nullbooth.report.plots import (
    drift_plot,
    image_grid,
    null_dims_heatmap,
    preservation_plot,
    spectrum_plot,
)
from nullbooth.report.probe import probe_section
from nullbooth.report.schema import FORMAT_VERSION, check_report, read_report
from nullbooth.stats.manifest import Manifest
from nullbooth.storage import RunDir


# -- what training and statistics left -----------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_preservation(run: RunDir, lora_dir: str = LORA_DIR) -> dict | None:
    """The training stage's preservation errors (<lora_dir>/report.json), normalised; None when training left none.

    The errors sit under "preservation" (as the training stage writes them) or at the top level; per_timestep
    entries are either a number or {"overall": ..., "per_layer": ...}.
    """
    source = f"{lora_dir}/{REPORT_NAME}"
    if not run.exists(source):
        return None
    raw = run.read_json(source)
    if not isinstance(raw, dict):
        raise NullBoothError(f"{run.uri(source)}: expected a JSON object")
    errors = raw["preservation"] if isinstance(raw.get("preservation"), dict) else (
        {} if "preservation" in raw else raw)  # "preservation": null: trained without statistics (mode none)
    per_t = {str(t): _finite(v.get("overall") if isinstance(v, dict) else v)
             for t, v in (errors.get("per_timestep") or {}).items()}
    return {"source": source, "mode": raw.get("mode") if isinstance(raw.get("mode"), str) else None,
            "overall": _finite(errors.get("overall")), "max": _finite(errors.get("max")),
            "per_layer": {str(k): _finite(v) for k, v in (errors.get("per_layer") or {}).items()},
            "per_timestep": per_t, "unprotected": [str(n) for n in raw.get("unprotected") or []]}


def null_space_section(manifest: Manifest | None) -> dict | None:
    """Null-space dimensions (and global τ) per protected layer from the manifest; None without statistics."""
    if manifest is None:
        return None
    spectra, text_layers = manifest.spectra, manifest.text_layers
    text = None
    if text_layers:
        text = {"layers": text_layers, "in_features": manifest.in_features(text_layers[0]),
                "dim": manifest.null_dim(text_layers[0]), "tau": _finite(spectra.get("text", {}).get("tau"))}
    layers = {name: {"in_features": manifest.in_features(name), "global": manifest.null_dim(name),
                     "per_timestep": {str(t): manifest.null_dim(name, t) for t in manifest.timesteps},
                     "tau": _finite(spectra.get("global", {}).get(name, {}).get("tau"))}
              for name in manifest.image_layers}
    return {"threshold": dict(manifest.threshold), "timesteps": list(manifest.timesteps), "text": text,
            "layers": layers}


def plain_baseline(run: RunDir, prompts: list[dict]) -> dict | None:
    """The baseline section for the plain LoRA trained beside this run's (train.plain_baseline): its preservation
    errors and its drift on the held-out prompts; None when the samples have no plain-LoRA images."""
    if not prompts or prompts[0]["plain"] is None:
        return None
    preservation = read_preservation(run, BASELINE_LORA_DIR) or {}
    return {"run_dir": run.uri(BASELINE_LORA_DIR), "mode": preservation.get("mode") or "none",
            "preservation_overall": preservation.get("overall"),
            "preservation_per_timestep": preservation.get("per_timestep", {}),
            "drift_holdout": mean_drift([p["plain"] for p in prompts if p["kind"] == "holdout"]),
            "_prompts": [{**p, **p["plain"]} for p in prompts]}  # for the drift plot only, dropped before writing


def _prompt_entry(e: PromptSamples) -> dict[str, Any]:
    drift = drift_metrics(e.base_latents, e.finetuned_latents, e.base, e.finetuned)
    plain = None
    if e.plain:
        plain = {"files": list(e.plain_files), **drift_metrics(e.base_latents, e.plain_latents, e.base, e.plain)}
    return {"prompt": e.prompt, "kind": e.kind, "seeds": [int(s) for s in e.seeds], "base": list(e.base_files),
            "finetuned": list(e.finetuned_files), **drift, "plain": plain}


def read_baseline(config: Config) -> dict | None:
    """generate.baseline_run's preservation errors and held-out drift (whichever it has); None when unset."""
    location = config.generate.baseline_run
    if not location:
        return None
    base = RunDir(location)
    preservation = read_preservation(base)
    report = read_report(base) if base.exists(REPORT_JSON) else None
    if preservation is None and report is None:
        raise NullBoothError(f"generate.baseline_run: {base.uri()} has neither {TRAIN_REPORT} nor {REPORT_JSON}; "
                             "train (and generate) the baseline run first")
    mode = (preservation or {}).get("mode") or (report or {}).get("projection_mode")
    return {"run_dir": base.uri(), "mode": mode,
            "preservation_overall": (preservation or {}).get("overall"),
            "preservation_per_timestep": (preservation or {}).get("per_timestep", {}),
            "drift_holdout": report["drift"]["holdout"] if report else None,
            "_prompts": report["prompts"] if report else []}  # for the drift plot only, dropped before writing


# -- the report ----------------------------------------------------------------------------------------------------
def write_report(config: Config, run: RunDir, samples: list[PromptSamples],
                 baseline: dict | None = None, attention: dict | None = None) -> dict[str, Any]:
    """Write report.json, report.md, the grid and the plots; returns {"grid", "report", "report_md", "drift", ...}.

    samples: one PromptSamples per prompt, its PNG files already written (report/generate.py). attention: the
    section report/attention.py wrote (its own attention.json), shown in report.md.
    """
    from nullbooth.stats.manifest import has_manifest, read_manifest

    prompts = [_prompt_entry(e) for e in samples]
    baseline = baseline if baseline is not None else (plain_baseline(run, prompts) or read_baseline(config))
    manifest = read_manifest(run) if has_manifest(run) else None
    preservation = read_preservation(run)
    height, width = samples[0].base[0].shape[:2]
    files: dict[str, Any] = {"grid": GRID, "report_md": REPORT_MD, "latents": LATENTS, "plots": {}}
    report = {
        "format_version": FORMAT_VERSION, "run_dir": run.uri(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"backend": config.model.backend, "path": config.model.path},
        "sampling": {"scheduler": config.sampling.scheduler, "num_inference_steps": config.sampling.num_inference_steps,
                     "guidance_scale": config.sampling.guidance_scale, "height": int(height), "width": int(width),
                     "seed_rule": seed_rule(config)},
        "projection_mode": config.projection.mode, "adapter": config.train.adapter,
        "lora_scale": config.generate.lora_scale, "prompts": prompts,
        "drift": {"definition": DRIFT_DEFINITION,
                  "holdout": mean_drift([p for p in prompts if p["kind"] == "holdout"]),
                  "instance": mean_drift([p for p in prompts if p["kind"] == "instance"])},
        "preservation": preservation,
        "null_space": null_space_section(manifest),
        "baseline": {k: v for k, v in baseline.items() if not k.startswith("_")} if baseline else None,
        "probe": probe_section(config, samples),
        "files": files,
    }
    run.write_bytes(files["grid"], _grid(config, run, samples))
    for name, data in _plots(config, run, report, manifest, baseline).items():
        rel = plot_file(name)
        run.write_bytes(rel, data)
        files["plots"][name] = rel
    check_report(report)
    from nullbooth.report.eval_report import current_evaluation
    from nullbooth.report.markdown import render_markdown

    run.write_bytes(REPORT_MD, render_markdown(report, current_evaluation(run), attention).encode())
    run.write_json(REPORT_JSON, report)  # last: its presence means the report is complete
    return {"grid": run.uri(files["grid"]), "report": run.uri(REPORT_JSON), "report_json": run.uri(REPORT_JSON),
            "report_md": run.uri(REPORT_MD),
            "plots": {k: run.uri(v) for k, v in files["plots"].items()}, "drift": report["drift"]["holdout"],
            "drift_instance": report["drift"]["instance"], "probe": report["probe"],
            "attention": [run.uri(p["grid"]) for p in attention["prompts"]] if attention else None}


GRID_HELD_OUT_ROWS = 12  # a page a person can read; every image is in samples/, every number in report.json


def _grid(config: Config, run: RunDir, samples: list[PromptSamples]) -> bytes:
    columns = {"base": "base", "finetuned": f"fine-tuned ({config.projection.mode})"}
    if samples[0].plain:
        columns["plain"] = "plain LoRA (none)"
    held = [e for e in samples if e.kind == "holdout"]
    rows = [e for e in samples if e.kind != "holdout"] + held[:GRID_HELD_OUT_ROWS]
    title = (f"{run.uri()}: base vs fine-tuned ({config.projection.mode}"
             + (" and plain LoRA" if samples[0].plain else "") + f", LoRA scale {config.generate.lora_scale:g})"
             + (f"; {GRID_HELD_OUT_ROWS} of {len(held)} held-out prompts" if len(held) > GRID_HELD_OUT_ROWS else ""))
    return image_grid(rows, title=title, columns=columns)


def _plots(config: Config, run: RunDir, report: dict, manifest: Manifest | None,
           baseline: dict | None) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    label = f"this run ({config.projection.mode})"
    series = {label: [(p["prompt"], p["kind"], p["latent_mse"]) for p in report["prompts"]]}
    if baseline and baseline["_prompts"]:
        theirs = {(p["prompt"], tuple(p["seeds"])): p["latent_mse"] for p in baseline["_prompts"]}
        matched = [theirs.get((p["prompt"], tuple(p["seeds"]))) for p in report["prompts"]]
        if all(v is not None for v in matched):
            series[f"baseline ({baseline['mode']})"] = [(p["prompt"], p["kind"], v)
                                                        for p, v in zip(report["prompts"], matched)]
    out["drift"] = drift_plot(series, "Drift of the fine-tuned model from the base model, per prompt",
                              "latent MSE (fine-tuned vs base, same seed)")
    preservation = {}
    if report["preservation"] and report["preservation"]["per_timestep"]:
        preservation[label] = report["preservation"]["per_timestep"]
    if baseline and baseline["preservation_per_timestep"]:
        preservation[f"baseline ({baseline['mode']})"] = baseline["preservation_per_timestep"]
    preservation = {k: {t: v for t, v in s.items() if v is not None} for k, s in preservation.items()}
    if any(preservation.values()):
        out["preservation"] = preservation_plot(preservation, "Preservation error per timestep (from training)")
    if manifest is not None:
        out["spectrum"] = spectrum_plot(_spectra(run, manifest), "Key covariance spectra (global), per protected "
                                        f"layer; threshold {manifest.threshold['kind']}="
                                        f"{manifest.threshold['value']:g}")
        out["null_dims"] = _null_dims_figure(report["null_space"])
    return out


def _spectra(run: RunDir, manifest: Manifest) -> dict[str, dict]:
    from nullbooth.stats.store import read_projection

    kind, value = manifest.threshold["kind"], manifest.threshold["value"]
    spectra: dict[str, dict] = {}
    if manifest.text_layers:
        eig = read_projection(run, "text", manifest)["eigenvalues"]
        spectra["text keys (to_k, to_v)"] = {"eigenvalues": eig.numpy(), "tau": threshold_tau(eig, kind, value),
                                             "null_dim": manifest.null_dim(manifest.text_layers[0])}
    image = read_projection(run, "global", manifest)
    for name in manifest.image_layers:
        eig = image[f"{name}.eigenvalues"]
        spectra[name] = {"eigenvalues": eig.numpy(), "tau": threshold_tau(eig, kind, value),
                         "null_dim": manifest.null_dim(name)}
    return spectra


def _null_dims_figure(section: dict) -> bytes:
    columns = [str(t) for t in section["timesteps"]] + ["global"]
    names, widths, rows = [], [], []
    if section["text"] is not None:
        names.append("text keys (to_k, to_v)")
        widths.append(section["text"]["in_features"])
        rows.append([section["text"]["dim"]] * len(columns))
    for name, entry in section["layers"].items():
        names.append(name)
        widths.append(entry["in_features"])
        rows.append([entry["per_timestep"][t] for t in columns[:-1]] + [entry["global"]])
    return null_dims_heatmap(names, columns, np.asarray(rows, dtype=np.float64), widths,
                             "Null-space dimension k per protected layer and timestep")
