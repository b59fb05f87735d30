"""`nullbooth compare RUN_A RUN_B`: one table and one plot, e.g. a global run against a none run.

Both runs must have a report (`nullbooth generate`). Drift is compared on the held-out preserved prompts the two
reports share with the same seeds, so the numbers are computed on exactly the same (prompt, seed) pairs.
Output (default RUN_A/report/compare/): compare.md, compare.csv, compare.png; the table is printed too.
When a run has a report/eval.json made with its current LoRA (`nullbooth eval`), the table adds its pooled
feature-space drift and subject fidelity (compare.EVAL_COLUMNS).
Two runs on different base models are still compared, with a one-line warning (printed, and on the page): the base
model is told by its UNet fingerprint where both runs recorded one, else by backend and model path.
"""

from __future__ import annotations

import csv
import io
from typing import Any

from nullbooth.layout import COMPARE_DIR, LORA_DIR, REPORT_NAME
from nullbooth.report.drift import mean_drift
from nullbooth.report.plots import compare_plot
from nullbooth.report.schema import read_report
from nullbooth.storage import RunDir

COLUMNS = [("run", "run"), ("mode", "mode"), ("holdout_prompts", "held-out prompts"),
           ("drift_latent_mse", "drift latent MSE"), ("drift_pixel_psnr_db", "drift pixel PSNR (dB)"),
           ("preservation_overall", "preservation error (overall)"), ("null_text", "null dims text k/d"),
           ("null_image", "null dims image Σk/Σd (global)")]


# Shown when either run has a report/eval.json made with its current LoRA (`nullbooth eval`): the pooled drift of
# the fine-tuned model from the base model in the first extractor's features, and that extractor's subject fidelity.
EVAL_COLUMNS = [("eval_features", "eval features"), ("eval_fd", "FD"), ("eval_mmd2", "MMD²"),
                ("eval_coverage", "coverage"), ("eval_1nna", "1-NNA"), ("eval_fidelity", "subject fidelity")]


def eval_cells(evaluation: dict | None) -> dict[str, Any]:
    """The EVAL_COLUMNS of one run (all None without an evaluation)."""
    if evaluation is None:
        return {key: None for key, _ in EVAL_COLUMNS}
    name = next(iter(evaluation["drift"]))
    pooled = evaluation["drift"][name]["pooled"]["finetuned"]
    fidelity = evaluation["fidelity"][name]
    return {"eval_features": name, "eval_fd": pooled["fd"], "eval_mmd2": pooled["mmd2"],
            "eval_coverage": pooled["coverage"], "eval_1nna": pooled["one_nn_accuracy"],
            "eval_fidelity": f"{fidelity['image_score']} {fidelity['finetuned']['image']:.4g}"}


def _key(prompt: dict) -> tuple:
    return prompt["prompt"], tuple(prompt["seeds"])


def _row(label: str, report: dict, common: list[tuple]) -> dict[str, Any]:
    by_key = {_key(p): p for p in report["prompts"]}
    held = [by_key[k] for k in common]
    drift = mean_drift(held) or {}
    ns = report["null_space"]
    text = image = None
    if ns is not None:
        if ns["text"] is not None:
            text = f"{ns['text']['dim']}/{ns['text']['in_features']}"
        if ns["layers"]:
            image = (f"{sum(e['global'] for e in ns['layers'].values())}/"
                     f"{sum(e['in_features'] for e in ns['layers'].values())}")
    preservation = report["preservation"] or {}
    return {"run": label, "run_dir": report["run_dir"], "mode": preservation.get("mode") or report["projection_mode"],
            "holdout_prompts": len(held), "drift_latent_mse": drift.get("latent_mse"),
            "drift_pixel_psnr_db": drift.get("pixel_psnr_db"), "drift_identical": drift.get("pixel_mse") == 0.0,
            "preservation_overall": preservation.get("overall"), "null_text": text, "null_image": image}


def _cell(row: dict, key: str) -> str:
    value = row[key]
    if key == "drift_pixel_psnr_db" and value is None and row["drift_identical"]:
        return "inf"
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def format_table(rows: list[dict]) -> tuple[str, str]:
    """(Markdown table, CSV text) of the comparison rows (with the eval columns when a row has an evaluation)."""
    columns = COLUMNS + (EVAL_COLUMNS if any(r.get("eval_features") for r in rows) else [])
    md = ["| " + " | ".join(title for _, title in columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(_cell(r, k) for k, _ in columns) + " |" for r in rows]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run_dir"] + [k for k, _ in columns])
    for r in rows:
        writer.writerow([r["run_dir"]] + ["" if r[k] is None else r[k] for k, _ in columns])
    return "\n".join(md) + "\n", buffer.getvalue()


def base_model(run: RunDir, report: dict) -> dict[str, Any]:
    """The base model a run was made on: backend and path from its report, and the UNet fingerprint its statistics
    manifest (or else its LoRA's training report) records, None when it has neither."""
    from nullbooth.stats.manifest import has_manifest, read_manifest

    fingerprint = read_manifest(run).fingerprint if has_manifest(run) else None
    trained = f"{LORA_DIR}/{REPORT_NAME}"
    if fingerprint is None and run.exists(trained):
        raw = run.read_json(trained)
        signature = raw.get("signature") if isinstance(raw, dict) else None
        fingerprint = signature.get("fingerprint") if isinstance(signature, dict) else None
    return {"backend": report["model"]["backend"], "path": report["model"]["path"], "fingerprint": fingerprint}


def model_warning(models: list[dict[str, Any]], labels: list[str]) -> str | None:
    """One line when the two runs' base models differ, else None."""
    a, b = models
    if a["fingerprint"] and b["fingerprint"]:
        same = a["fingerprint"] == b["fingerprint"]
    else:
        same = (a["backend"], a["path"]) == (b["backend"], b["path"])
    if same:
        return None

    def describe(m: dict[str, Any]) -> str:
        return f"{m['backend']} {m['path']!r}" + (f" (UNet {m['fingerprint']})" if m["fingerprint"] else "")

    return (f"the two runs have different base models ({labels[0]}: {describe(a)}; {labels[1]}: {describe(b)}); "
            "their drift and preservation figures are not comparable")


def compare_runs(run_a: str, run_b: str, out_dir: str | None = None) -> dict[str, Any]:
    runs = [RunDir(run_a), RunDir(run_b)]
    reports = [read_report(r) for r in runs]
    names = [r.uri().rstrip("/").rsplit("/", 1)[-1] or r.uri() for r in runs]
    labels = [f"A: {names[0]}", f"B: {names[1]}"] if names[0] != names[1] else ["A", "B"]
    keys_b = {_key(p) for p in reports[1]["prompts"] if p["kind"] == "holdout"}
    common = [_key(p) for p in reports[0]["prompts"] if p["kind"] == "holdout" and _key(p) in keys_b]
    from nullbooth.report.eval_report import current_evaluation

    rows = [{**_row(label, report, common), **eval_cells(current_evaluation(run))}
            for label, report, run in zip(labels, reports, runs)]
    markdown, csv_text = format_table(rows)
    warning = model_warning([base_model(run, report) for run, report in zip(runs, reports)], labels)

    preservation = {f"{label} ({row['mode']})": {t: v for t, v in (rep["preservation"] or {}).get(
        "per_timestep", {}).items() if v is not None} for label, row, rep in zip(labels, rows, reports)}
    preservation = {k: v for k, v in preservation.items() if v}
    drift = {}
    for label, row, report in zip(labels, rows, reports):
        by_key = {_key(p): p for p in report["prompts"]}
        drift[f"{label} ({row['mode']})"] = [(k[0], "holdout", by_key[k]["latent_mse"]) for k in common]
    plot = compare_plot(preservation, drift if common else {}, f"{labels[0]} vs {labels[1]}",
                        "latent MSE (fine-tuned vs base, same seed)")

    out = RunDir(out_dir) if out_dir else RunDir(runs[0].uri(COMPARE_DIR))
    note = ("" if common else "\nThe runs share no held-out prompt with the same seeds: drift is not compared.\n")
    note += f"\n**Warning:** {warning}.\n" if warning else ""
    page = (f"# Comparison\n\n- A: `{reports[0]['run_dir']}`\n- B: `{reports[1]['run_dir']}`\n\n"
            f"Drift is measured on the {len(common)} held-out preserved prompts both runs sampled with the same "
            f"seeds.{note}\n{markdown}\n![comparison](compare.png)\n")
    out.write_bytes("compare.png", plot)
    out.write_bytes("compare.csv", csv_text.encode())
    out.write_bytes("compare.md", page.encode())
    return {"rows": rows, "table": markdown, "markdown": out.uri("compare.md"), "csv": out.uri("compare.csv"),
            "plot": out.uri("compare.png"), "warnings": [warning] if warning else []}


def format_summary(summary: dict[str, Any]) -> str:
    """What `nullbooth compare` prints: the table, then where the page and the plot are."""
    return summary["table"] + f"\ntable: {summary['markdown']}\nplot:  {summary['plot']}"
