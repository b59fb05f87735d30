"""The end-of-stage summary: per layer (d, null-space dimension, eigenvalue range) and per timestep (row counts),
as a dict (returned by `build_covariance`) and as a plain-text table (printed).

Everything comes from the manifest, so a reused run prints the same summary as the run that made it.
"""

from __future__ import annotations

from typing import Any

from nullbooth.formatting import number
from nullbooth.stats.manifest import Manifest
from nullbooth.stats.moments import timestep_calls


def plan_note(plan: list[int]) -> str | None:
    """One line saying which timesteps a sampler's plan repeats and how the statistics treat them (None: no repeat)."""
    calls = timestep_calls(plan)
    repeated = [f"{t} ×{c}" for t, c in calls.items() if c > 1]
    if not repeated:
        return None
    return (f"the plan repeats timesteps ({', '.join(repeated)}: {len(plan)} UNet calls at {len(calls)} distinct "
            "timesteps); the statistics keep one covariance per distinct timestep, holding every call at it, and "
            "the global covariance weights each timestep by its number of calls")


def empty_null_spaces(manifest: Manifest) -> tuple[list[str], list[str]]:
    """(warnings, protected layers whose global/text null space is empty)."""
    empty = [name for name in manifest.layers if manifest.null_dim(name) == 0]
    threshold = f"{manifest.threshold['kind']}={manifest.threshold['value']:g}"
    warnings = [f"{name}: empty null space (threshold {threshold}); its LoRA update cannot move at all"
                for name in empty]
    per_t = [(t, name) for t in manifest.timesteps for name in manifest.image_layers
             if manifest.null_dim(name, t) == 0]
    if per_t:
        warnings.append(f"{len(per_t)} of {len(manifest.timesteps) * len(manifest.image_layers)} per-timestep image "
                        f"bases are empty (first: {per_t[0][1]} at t={per_t[0][0]})")
    return warnings, empty


def summarize(manifest: Manifest, run_uri: str, reused: bool, **extra: Any) -> dict[str, Any]:
    text_layers = set(manifest.text_layers)
    layers = {}
    for name in manifest.layers:
        text = name in text_layers
        spec = manifest.spectra.get("text", {}) if text else manifest.spectra.get("global", {}).get(name, {})
        layers[name] = {"side": "text" if text else "image", "d": manifest.in_features(name),
                        "null_dim": manifest.null_dim(name),
                        "null_dim_per_timestep": [] if text else [manifest.null_dim(name, t) for t in manifest.timesteps],
                        "eig_min": spec.get("eig_min"), "eig_max": spec.get("eig_max"), "tau": spec.get("tau")}
    warnings, _ = empty_null_spaces(manifest)
    return {"run_dir": run_uri, "reused": reused, "backend": manifest.backend, "fingerprint": manifest.fingerprint,
            "prompts": len(manifest.prompts), "holdout_prompts": len(manifest.holdout_prompts),
            "timesteps": list(manifest.timesteps), "plan": manifest.timestep_plan, "text_rows": manifest.text_rows,
            "image_rows": manifest.image_rows,
            "layers": layers, "warnings": warnings, **manifest.collection, **extra}


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
                     f"{number(row['eig_min'], '.3g', '-')} .. {number(row['eig_max'], '.3g', '-')}")
    lines.append(f"  {'timestep':>8}  image rows (all layers)  rows per layer (min .. max)")
    for t in summary["timesteps"]:
        rows = summary["image_rows"][str(t)]
        counts = list(rows.values()) or [0]
        lines.append(f"  {t:>8}  {sum(counts):>23}  {min(counts)} .. {max(counts)}")
    note = plan_note(summary["plan"])
    lines += [f"  note: {note}"] if note else []
    lines += [f"  warning: {w}" for w in summary["warnings"]]
    return "\n".join(lines)
