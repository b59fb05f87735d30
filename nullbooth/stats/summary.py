"""The end-of-stage summary: per layer (d, null-space dimension, eigenvalue range) and per timestep (row counts),
as a dict (returned by `build_covariance`) and as a plain-text table (printed).

Everything comes from the manifest, so a reused run prints the same summary as the run that made it.
"""

from __future__ import annotations

from typing import Any


def empty_null_spaces(manifest: dict) -> tuple[list[str], list[str]]:
    """(warnings, protected layers whose global/text null space is empty)."""
    dims = manifest["null_dims"]
    empty = [name for name, entry in manifest["layers"].items()
             if (dims["text"] if entry["side"] == "text" else dims["global"][name]) == 0]
    warnings = [f"{name}: empty null space (threshold {manifest['threshold']['kind']}="
                f"{manifest['threshold']['value']:g}); its LoRA update cannot move at all" for name in empty]
    per_t = [(t, name) for t, layers in dims["timesteps"].items() for name, k in layers.items() if k == 0]
    if per_t:
        warnings.append(f"{len(per_t)} of {sum(len(v) for v in dims['timesteps'].values())} per-timestep image bases "
                        f"are empty (first: {per_t[0][1]} at t={per_t[0][0]})")
    return warnings, empty


def summarize(manifest: dict, run_uri: str, reused: bool, **extra: Any) -> dict[str, Any]:
    dims = manifest["null_dims"]
    spectra = manifest.get("spectra", {})
    layers = {}
    for name, entry in manifest["layers"].items():
        text = entry["side"] == "text"
        spec = spectra.get("text", {}) if text else spectra.get("global", {}).get(name, {})
        per_t = [dims["timesteps"][str(t)][name] for t in manifest["timesteps"]] if not text else []
        layers[name] = {"side": entry["side"], "d": entry["in_features"],
                        "null_dim": dims["text"] if text else dims["global"][name],
                        "null_dim_per_timestep": per_t, "eig_min": spec.get("eig_min"),
                        "eig_max": spec.get("eig_max"), "tau": spec.get("tau")}
    warnings, _ = empty_null_spaces(manifest)
    return {"run_dir": run_uri, "reused": reused, "backend": manifest["backend"],
            "fingerprint": manifest["model"]["fingerprint"], "prompts": len(manifest["prompts"]),
            "holdout_prompts": len(manifest["holdout_prompts"]), "timesteps": list(manifest["timesteps"]),
            "text_rows": manifest["text_rows"], "image_rows": manifest["image_rows"], "layers": layers,
            "warnings": warnings, **manifest.get("collection", {}), **extra}


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as the table a person reads at the end of `build-cov`."""
    head = "reused complete run" if summary["reused"] else "statistics written"
    lines = [f"nullbooth build-cov: {head} at {summary['run_dir']}",
             (f"  {summary['prompts']} prompts ({summary['holdout_prompts']} held out), timesteps "
              f"{summary['timesteps']}, {summary['text_rows']} text rows, model {summary['fingerprint']}")]
    width = max(len(name) for name in summary["layers"])
    lines.append(f"  {'layer':<{width}}  side    d  null  per-t null  eigenvalues (min .. max)")
    for name, row in summary["layers"].items():
        per_t = row["null_dim_per_timestep"]
        span = f"{min(per_t)}..{max(per_t)}" if per_t else "-"
        lines.append(f"  {name:<{width}}  {row['side']:<5} {row['d']:>4} {row['null_dim']:>5}  {span:>10}  "
                     f"{_g(row['eig_min'])} .. {_g(row['eig_max'])}")
    lines.append(f"  {'timestep':>8}  image rows (all layers)  rows per layer (min .. max)")
    for t in summary["timesteps"]:
        rows = summary["image_rows"][str(t)]
        counts = list(rows.values()) or [0]
        lines.append(f"  {t:>8}  {sum(counts):>23}  {min(counts)} .. {max(counts)}")
    lines += [f"  warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)
