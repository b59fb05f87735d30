"""The run's report: image-level drift, layer-level preservation, null-space dimensions, grids and plots.

Everything goes under `run_dir/report/` through `RunDir` (atomic writes):

    report/report.json           the numbers, in the layout REPORT_SCHEMA fixes (check_report validates it)
    report/report.md             a short page linking every picture below
    report/grid.png              rows = prompts, columns = base / fine-tuned, labelled
    report/plots/drift.png       per-prompt drift (latent MSE), baseline alongside when given
    report/plots/preservation.png  preservation error per timestep (this run, and the baseline run)
    report/plots/spectrum.png    eigenvalue spectrum per protected layer (global covariance), τ marked
    report/plots/null_dims.png   null-space dimension per layer and timestep

Sources: the samples (nullbooth.generate), `lora/report.json` from training (optional: null when absent) and
`covariance/manifest.json` + `projection/*.safetensors` from the statistics (optional likewise).
"""

from __future__ import annotations

import datetime
import math
from typing import Any

import numpy as np

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.nullspace import threshold_tau
from nullbooth.plots import drift_plot, image_grid, null_dims_heatmap, preservation_plot, spectrum_plot
from nullbooth.storage import RunDir

FORMAT_VERSION = 1
REPORT_DIR = "report"
REPORT_JSON = f"{REPORT_DIR}/report.json"
REPORT_MD = f"{REPORT_DIR}/report.md"
TRAIN_REPORT = "lora/report.json"

DRIFT_DEFINITION = (
    "Fine-tuned against base, same prompt, scheduler, steps, guidance and seed. latent_mse: mean over elements of "
    "(z_finetuned - z_base)^2 of the final latents before the VAE decode; pixel_mse: the same over uint8 RGB values "
    "0..255; pixel_psnr_db = 10*log10(255^2 / pixel_mse), null when pixel_mse = 0 (identical images). Per prompt: "
    "averaged over its images. Means: over the prompts of that kind, the PSNR taken of the mean pixel_mse.")

# -- the schema of report.json -----------------------------------------------------------------------------------
# A spec is "int", "number", "nonneg" (number ≥ 0), "str", a dict {key: spec} (exactly these keys), or a tuple
# ("list", spec), ("map", spec) (str keys), ("nullable", spec), ("enum", value, ...).
_DRIFT_MEAN = {"prompts": "int", "latent_mse": "nonneg", "pixel_mse": "nonneg", "pixel_psnr_db": ("nullable", "number")}
_LAYER_DIMS = {"in_features": "int", "global": "int", "per_timestep": ("map", "int"), "tau": ("nullable", "number")}
REPORT_SCHEMA: dict[str, Any] = {
    "format_version": "int",
    "run_dir": "str",
    "created": "str",
    "model": {"backend": ("enum", "sd", "lcm"), "path": "str"},
    "sampling": {"scheduler": "str", "num_inference_steps": "int", "guidance_scale": "number", "height": "int",
                 "width": "int", "seed_rule": "str"},
    "projection_mode": "str",
    "lora_scale": "number",
    "prompts": ("list", {"prompt": "str", "kind": ("enum", "instance", "holdout", "custom"), "seeds": ("list", "int"),
                         "base": ("list", "str"), "finetuned": ("list", "str"), "latent_mse": "nonneg",
                         "pixel_mse": "nonneg", "pixel_psnr_db": ("nullable", "number")}),
    "drift": {"definition": "str", "holdout": ("nullable", _DRIFT_MEAN), "instance": ("nullable", _DRIFT_MEAN)},
    "preservation": ("nullable", {"source": "str", "mode": ("nullable", "str"), "overall": ("nullable", "nonneg"),
                                  "max": ("nullable", "nonneg"), "per_layer": ("map", ("nullable", "nonneg")),
                                  "per_timestep": ("map", ("nullable", "nonneg")), "unprotected": ("list", "str")}),
    "null_space": ("nullable", {"threshold": {"kind": "str", "value": "number"}, "timesteps": ("list", "int"),
                                "text": ("nullable", {"layers": ("list", "str"), "in_features": "int", "dim": "int",
                                                      "tau": ("nullable", "number")}),
                                "layers": ("map", _LAYER_DIMS)}),
    "baseline": ("nullable", {"run_dir": "str", "mode": ("nullable", "str"),
                              "preservation_overall": ("nullable", "nonneg"),
                              "preservation_per_timestep": ("map", ("nullable", "nonneg")),
                              "drift_holdout": ("nullable", _DRIFT_MEAN)}),
    "files": {"grid": "str", "report_md": "str", "latents": "str", "plots": ("map", "str")},
}


def _check(value: Any, spec: Any, path: str) -> None:
    def fail(expected: str) -> None:
        raise NullBoothError(f"{path}: expected {expected}, got {type(value).__name__} {value!r:.60}")

    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if spec == "int":
        if not (isinstance(value, int) and not isinstance(value, bool)):
            fail("an integer")
    elif spec == "number":
        if not is_number:
            fail("a finite number")
    elif spec == "nonneg":
        if not (is_number and value >= 0):
            fail("a finite number ≥ 0")
    elif spec == "str":
        if not isinstance(value, str):
            fail("a string")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            fail("an object")
        missing, extra = sorted(set(spec) - set(value)), sorted(set(value) - set(spec))
        if missing or extra:
            raise NullBoothError(f"{path}: " + "; ".join(
                ([f"missing key(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown key(s) {', '.join(extra)}"] if extra else [])))
        for key, sub in spec.items():
            _check(value[key], sub, f"{path}.{key}")
    elif spec[0] == "nullable":
        if value is not None:
            _check(value, spec[1], path)
    elif spec[0] == "enum":
        if value not in spec[1:]:
            fail("one of " + ", ".join(map(repr, spec[1:])))
    elif spec[0] == "list":
        if not isinstance(value, list):
            fail("a list")
        for i, item in enumerate(value):
            _check(item, spec[1], f"{path}[{i}]")
    elif spec[0] == "map":
        if not isinstance(value, dict):
            fail("an object")
        for key, item in value.items():
            _check(item, spec[1], f"{path}.{key}")


def check_report(report: Any) -> None:
    """Raise NullBoothError naming the first field of `report` that does not follow REPORT_SCHEMA."""
    _check(report, REPORT_SCHEMA, "report")
    if report["format_version"] != FORMAT_VERSION:
        raise NullBoothError(f"report.format_version: this NullBooth reads {FORMAT_VERSION}, "
                             f"got {report['format_version']}")


def read_report(run: RunDir) -> dict:
    """A run's validated report.json."""
    if not run.exists(REPORT_JSON):
        raise NullBoothError(f"{run.uri(REPORT_JSON)} does not exist: run `nullbooth generate` on that run first")
    report = run.read_json(REPORT_JSON)
    try:
        check_report(report)
    except NullBoothError as err:
        raise NullBoothError(f"{run.uri(REPORT_JSON)}: {err}") from None
    return report


# -- drift -------------------------------------------------------------------------------------------------------
def psnr_db(pixel_mse: float) -> float | None:
    """PSNR of uint8 images; None for identical images (infinite PSNR, which JSON cannot hold)."""
    return None if pixel_mse == 0 else 10.0 * math.log10(255.0 ** 2 / pixel_mse)


def drift_metrics(base_latents: list[np.ndarray], tuned_latents: list[np.ndarray],
                  base_images: list[np.ndarray], tuned_images: list[np.ndarray]) -> dict[str, float | None]:
    """Drift of one prompt's fine-tuned samples against its base samples, averaged over the images."""
    latent = [float(np.mean((t.astype(np.float64) - b.astype(np.float64)) ** 2))
              for b, t in zip(base_latents, tuned_latents)]
    pixel = [float(np.mean((t.astype(np.float64) - b.astype(np.float64)) ** 2))
             for b, t in zip(base_images, tuned_images)]
    pixel_mse = float(np.mean(pixel))
    return {"latent_mse": float(np.mean(latent)), "pixel_mse": pixel_mse, "pixel_psnr_db": psnr_db(pixel_mse)}


def mean_drift(entries: list[dict]) -> dict | None:
    if not entries:
        return None
    pixel_mse = float(np.mean([e["pixel_mse"] for e in entries]))
    return {"prompts": len(entries), "latent_mse": float(np.mean([e["latent_mse"] for e in entries])),
            "pixel_mse": pixel_mse, "pixel_psnr_db": psnr_db(pixel_mse)}


# -- what training and statistics left -----------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def read_preservation(run: RunDir) -> dict | None:
    """The training stage's preservation errors (lora/report.json), normalised; None when training left none.

    The errors sit under "preservation" (as the training stage writes them) or at the top level; per_timestep
    entries are either a number or {"overall": ..., "per_layer": ...}.
    """
    if not run.exists(TRAIN_REPORT):
        return None
    raw = run.read_json(TRAIN_REPORT)
    if not isinstance(raw, dict):
        raise NullBoothError(f"{run.uri(TRAIN_REPORT)}: expected a JSON object")
    errors = raw["preservation"] if isinstance(raw.get("preservation"), dict) else (
        {} if "preservation" in raw else raw)  # "preservation": null: trained without statistics (mode none)
    per_t = {str(t): _finite(v.get("overall") if isinstance(v, dict) else v)
             for t, v in (errors.get("per_timestep") or {}).items()}
    return {"source": TRAIN_REPORT, "mode": raw.get("mode") if isinstance(raw.get("mode"), str) else None,
            "overall": _finite(errors.get("overall")), "max": _finite(errors.get("max")),
            "per_layer": {str(k): _finite(v) for k, v in (errors.get("per_layer") or {}).items()},
            "per_timestep": per_t, "unprotected": [str(n) for n in raw.get("unprotected") or []]}


def null_space_section(run: RunDir, manifest: dict | None) -> dict | None:
    """Null-space dimensions (and global τ) per protected layer from the manifest; None without statistics."""
    if manifest is None:
        return None
    dims, spectra = manifest["null_dims"], manifest.get("spectra", {})
    text_layers = [n for n, e in manifest["layers"].items() if e["side"] == "text"]
    text = None
    if text_layers:
        text = {"layers": text_layers, "in_features": manifest["layers"][text_layers[0]]["in_features"],
                "dim": dims["text"], "tau": _finite(spectra.get("text", {}).get("tau"))}
    layers = {name: {"in_features": e["in_features"], "global": dims["global"][name],
                     "per_timestep": {str(t): dims["timesteps"][str(t)][name] for t in manifest["timesteps"]},
                     "tau": _finite(spectra.get("global", {}).get(name, {}).get("tau"))}
              for name, e in manifest["layers"].items() if e["side"] == "image"}
    return {"threshold": dict(manifest["threshold"]), "timesteps": list(manifest["timesteps"]), "text": text,
            "layers": layers}


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
def write_report(config: Config, run: RunDir, samples: list[dict], baseline: dict | None = None) -> dict[str, Any]:
    """Write report.json, report.md, the grid and the plots; returns {"grid", "report", "report_md", "drift", ...}.

    samples: nullbooth.generate's per-prompt entries (prompt, kind, seeds, images, latents, *_files).
    """
    from nullbooth.stats.store import has_manifest, read_manifest

    baseline = baseline if baseline is not None else read_baseline(config)
    prompts = []
    for e in samples:
        drift = drift_metrics(e["base_latent"], e["finetuned_latent"], e["base"], e["finetuned"])
        prompts.append({"prompt": e["prompt"], "kind": e["kind"], "seeds": [int(s) for s in e["seeds"]],
                        "base": list(e["base_files"]), "finetuned": list(e["finetuned_files"]), **drift})
    manifest = read_manifest(run) if has_manifest(run) else None
    preservation = read_preservation(run)
    height, width = samples[0]["base"][0].shape[:2]
    files: dict[str, Any] = {"grid": f"{REPORT_DIR}/grid.png", "report_md": REPORT_MD,
                             "latents": "samples/latents.safetensors", "plots": {}}
    report = {
        "format_version": FORMAT_VERSION, "run_dir": run.uri(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": {"backend": config.model.backend, "path": config.model.path},
        "sampling": {"scheduler": config.sampling.scheduler, "num_inference_steps": config.sampling.num_inference_steps,
                     "guidance_scale": config.sampling.guidance_scale, "height": int(height), "width": int(width),
                     "seed_rule": f"image i of prompt j: {config.generate.seed} + 1000*j + i"},
        "projection_mode": config.projection.mode, "lora_scale": config.generate.lora_scale,
        "prompts": prompts,
        "drift": {"definition": DRIFT_DEFINITION,
                  "holdout": mean_drift([p for p in prompts if p["kind"] == "holdout"]),
                  "instance": mean_drift([p for p in prompts if p["kind"] == "instance"])},
        "preservation": preservation,
        "null_space": null_space_section(run, manifest),
        "baseline": {k: v for k, v in baseline.items() if not k.startswith("_")} if baseline else None,
        "files": files,
    }
    run.write_bytes(files["grid"], image_grid(samples, title=f"{run.uri()}: base vs fine-tuned "
                                                           f"({config.projection.mode}, LoRA scale "
                                                           f"{config.generate.lora_scale:g})"))
    for name, data in _plots(config, run, report, manifest, baseline).items():
        rel = f"{REPORT_DIR}/plots/{name}.png"
        run.write_bytes(rel, data)
        files["plots"][name] = rel
    check_report(report)
    from nullbooth.report_md import render_markdown

    run.write_bytes(REPORT_MD, render_markdown(report).encode())
    run.write_json(REPORT_JSON, report)  # last: its presence means the report is complete
    return {"grid": run.uri(files["grid"]), "report": run.uri(REPORT_JSON), "report_json": run.uri(REPORT_JSON),
            "report_md": run.uri(REPORT_MD),
            "plots": {k: run.uri(v) for k, v in files["plots"].items()}, "drift": report["drift"]["holdout"],
            "drift_instance": report["drift"]["instance"]}


def _plots(config: Config, run: RunDir, report: dict, manifest: dict | None, baseline: dict | None) -> dict[str, bytes]:
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
                                        f"layer; threshold {manifest['threshold']['kind']}="
                                        f"{manifest['threshold']['value']:g}")
        out["null_dims"] = _null_dims_figure(report["null_space"])
    return out


def _spectra(run: RunDir, manifest: dict) -> dict[str, dict]:
    from nullbooth.stats.store import read_projection

    kind, value = manifest["threshold"]["kind"], manifest["threshold"]["value"]
    spectra: dict[str, dict] = {}
    if any(e["side"] == "text" for e in manifest["layers"].values()):
        eig = read_projection(run, "text")["eigenvalues"]
        spectra["text keys (to_k, to_v)"] = {"eigenvalues": eig.numpy(), "tau": threshold_tau(eig, kind, value),
                                             "null_dim": manifest["null_dims"]["text"]}
    image = read_projection(run, "global")
    for name, entry in manifest["layers"].items():
        if entry["side"] == "image":
            eig = image[f"{name}.eigenvalues"]
            spectra[name] = {"eigenvalues": eig.numpy(), "tau": threshold_tau(eig, kind, value),
                             "null_dim": manifest["null_dims"]["global"][name]}
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


def compare_runs(run_a: str, run_b: str, out_dir: str | None = None) -> dict[str, Any]:
    """One table (Markdown, CSV, printed) and one plot comparing two generated runs; see nullbooth.compare."""
    from nullbooth.compare import compare

    return compare(run_a, run_b, out_dir)
