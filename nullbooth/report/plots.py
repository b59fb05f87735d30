"""Pictures of a run: labelled base / fine-tuned grids (PIL) and the report's plots (matplotlib, Agg backend).

Every function returns PNG bytes, so the caller writes them through `RunDir` (atomic, local or cloud alike).
"""

from __future__ import annotations

import io
import math
import textwrap

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nullbooth.storage import png_bytes

GRID_CELL = 128  # tiny 32x32 samples are upscaled (NEAREST: no invented detail); SD's 512px ones shrunk to 256
MAX_CELL = 256
KIND_COLORS = {"instance": "#d95f02", "class": "#e7298a", "holdout": "#1b9e77", "custom": "#7570b3"}


def short_layer(name: str) -> str:
    """'up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_q' -> 'up1.a0.t0 q' (readable in plot labels)."""
    parts = name.split(".")
    out: list[str] = []
    for i, part in enumerate(parts):
        nxt = parts[i + 1] if i + 1 < len(parts) else ""
        if part in ("down_blocks", "up_blocks"):
            out.append(part.split("_")[0] + nxt)
        elif part == "mid_block":
            out.append("mid")
        elif part == "attentions":
            out.append(f"a{nxt}")
        elif part == "transformer_blocks":
            out.append(f"t{nxt}")
    leaf = name.split("attn2.")[-1].replace("to_", "").replace("out.0", "out") if "attn2." in name else parts[-1]
    return (".".join(out) + " " + leaf).strip() if out else name


# ---------------------------------------------------------------------------------------------------------------
# Grids


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _cell(image: np.ndarray) -> Image.Image:
    img = Image.fromarray(image)
    side = max(img.size)
    if side < GRID_CELL:
        factor = math.ceil(GRID_CELL / side)
        return img.resize((img.width * factor, img.height * factor), Image.NEAREST)
    if side > MAX_CELL:
        scale = MAX_CELL / side
        return img.resize((round(img.width * scale), round(img.height * scale)), Image.LANCZOS)
    return img


def image_grid(rows: list, title: str = "", columns: dict[str, str] | None = None) -> bytes:
    """Rows = prompts, column groups = models (base, fine-tuned, ...), each group one cell per seed, labelled.

    rows: records with .prompt, .kind and one list of uint8 HxWx3 images per column group, such as
    nullbooth.report.plan.PromptSamples. Rows may hold fewer images than others (a held-out prompt gets one, an
    instance prompt generate.subject_images): each group is as wide as the longest row, and a row's cells start at
    its group's first column, under the group's label. columns: {attribute: label}, in order (default: base and
    fine-tuned).
    """
    columns = columns or {"base": "base", "finetuned": "fine-tuned"}
    n = max(len(getattr(row, attr)) for row in rows for attr in columns)
    cells = [[(g * n + i, _cell(a)) for g, attr in enumerate(columns) for i, a in enumerate(getattr(row, attr))]
             for row in rows]
    cw, ch = cells[0][0][1].size
    pad, gap, label_w, header_h = 6, 10, 260, 46 if title else 26
    font, small, bold = _font(14), _font(12), _font(16)
    width = label_w + len(columns) * (n * (cw + pad) + gap) + pad
    if title:
        width = max(width, int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=bold)) + 2 * pad)
    height = header_h + len(rows) * (ch + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 4), title, fill="black", font=bold)
    col_x = [label_w + j * (cw + pad) + (j // n) * gap for j in range(len(columns) * n)]  # a gap between groups
    for g, label in enumerate(columns.values()):
        draw.text((col_x[g * n], header_h - 22), label, fill="black", font=font)
    for r, (row, row_cells) in enumerate(zip(rows, cells)):
        y = header_h + r * (ch + pad)
        kind = row.kind
        draw.rectangle([pad, y, pad + 4, y + ch], fill=KIND_COLORS.get(kind, "#999999"))
        text = "\n".join(textwrap.wrap(row.prompt, 30)[:5])
        draw.multiline_text((pad + 10, y + 2), text, fill="black", font=font, spacing=2)
        if kind:
            draw.text((pad + 10, y + ch - 16), kind, fill=KIND_COLORS.get(kind, "#555555"), font=small)
        for column, cell in row_cells:
            canvas.paste(cell, (col_x[column], y))
    return png_bytes(canvas)


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # no display on clusters; the report only needs files
    import matplotlib.pyplot as plt

    return plt


def _figure_bytes(fig) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def spectrum_plot(spectra: dict[str, dict], title: str) -> bytes:
    """Small multiples: sorted eigenvalues of each layer's covariance (log scale), τ dashed, null space shaded.

    spectra: label -> {"eigenvalues": 1-D array (ascending), "tau": float, "null_dim": int}
    """
    plt = _pyplot()
    names = list(spectra)
    cols = min(5, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.5 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        entry = spectra[name]
        lam = np.sort(np.asarray(entry["eigenvalues"], dtype=np.float64))[::-1]  # largest first, as usual
        floor = max(lam.max(), 1e-300) * 1e-16  # eigh returns tiny negatives for zero modes
        ax.semilogy(np.arange(1, len(lam) + 1), np.clip(lam, floor, None), ".-", ms=2.5, lw=0.8, color="#1f4e79")
        k = int(entry["null_dim"])
        if k:
            ax.axvspan(len(lam) - k + 0.5, len(lam) + 0.5, color="#1b9e77", alpha=0.15, lw=0)
        tau = entry["tau"]
        if tau is not None and np.isfinite(tau) and tau > 0:
            ax.axhline(max(tau, floor), color="#d95f02", ls="--", lw=1)
        ax.set_title(f"{short_layer(name)}  (null {k}/{len(lam)})", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("index (largest first)", fontsize=7)
        ax.set_ylabel("eigenvalue", fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{title}\norange dashed: τ; shaded: null space (eigenvalue ≤ τ)", fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def null_dims_heatmap(layers: list[str], columns: list[str], dims: np.ndarray, widths: list[int],
                      title: str) -> bytes:
    """Null-space dimension per layer (rows) and timestep (columns), coloured by k/d, annotated with k."""
    plt = _pyplot()
    fraction = dims / np.asarray(widths, dtype=np.float64)[:, None]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns) + 2.2, 0.9 + 0.32 * len(layers)))
    image = ax.imshow(fraction, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(columns)), columns, fontsize=8)
    ax.set_yticks(range(len(layers)), [f"{short_layer(n)} (d={w})" for n, w in zip(layers, widths)], fontsize=8)
    ax.set_xlabel("timestep (sampling order)")
    ax.set_ylabel("protected layer")
    if columns and columns[-1] == "global":  # the global basis is not a timestep: set it apart
        ax.axvline(len(columns) - 1.5, color="white", lw=3)
    if len(layers) * len(columns) <= 600:
        for i in range(len(layers)):
            for j in range(len(columns)):
                ax.text(j, i, str(int(dims[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if fraction[i, j] < 0.6 else "black")
    fig.colorbar(image, ax=ax, label="null-space dimension / layer width")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def _draw_preservation(ax, series: dict[str, dict[str, float]]) -> None:
    order = sorted({int(t) for s in series.values() for t in s}, reverse=True)  # sampling order: noisy first
    positions = {t: i for i, t in enumerate(order)}
    positive = False
    for (label, values), style in zip(series.items(), ["o-", "s--", "^-.", "d:"] * 4):
        ts = sorted((int(t) for t in values), reverse=True)
        ys = [values[str(t)] for t in ts]
        positive |= any(y > 0 for y in ys)
        ax.plot([positions[t] for t in ts], ys, style, label=label, ms=5)
    ax.set_xticks(range(len(order)), [str(t) for t in order])
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("timestep (sampling order)")
    ax.set_ylabel("preservation error\nsqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)), RMS over layers", fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)


def preservation_plot(series: dict[str, dict[str, float]], title: str) -> bytes:
    """Overall preservation error per timestep, one line per run (label -> {timestep: error})."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    _draw_preservation(ax, series)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


_HATCHES = ["", "//", "..", "xx"]


def _draw_drift(ax, series: dict[str, list[tuple[str, str, float]]], metric: str) -> None:
    from matplotlib.patches import Patch

    labels = list(series)
    prompts = [p for p, _, _ in series[labels[0]]]
    kinds = [k for _, k, _ in series[labels[0]]]
    height = 0.8 / len(labels)
    for r, label in enumerate(labels):
        values = [v for _, _, v in series[label]]
        ys = np.arange(len(prompts)) + (r - (len(labels) - 1) / 2) * height
        ax.barh(ys, values, height=height, color=[KIND_COLORS.get(k, "#999999") for k in kinds],
                hatch=_HATCHES[r % len(_HATCHES)], edgecolor="black", lw=0.4, label=label)
    ax.set_yticks(range(len(prompts)), [textwrap.shorten(p, 42) for p in prompts], fontsize=7)
    ax.set_ylim(len(prompts) - 0.5, -0.5)  # first prompt on top
    ax.set_xlabel(metric)
    ax.grid(True, axis="x", alpha=0.3)
    handles = [Patch(facecolor=KIND_COLORS[k], label=f"{k} prompt") for k in dict.fromkeys(kinds) if k in KIND_COLORS]
    if len(labels) > 1:
        handles += [Patch(facecolor="white", edgecolor="black", hatch=_HATCHES[r % len(_HATCHES)], label=label)
                    for r, label in enumerate(labels)]
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def _drift_height(series: dict) -> float:
    rows = len(next(iter(series.values())))
    return 1.2 + 0.28 * rows * max(1.0, 0.7 * len(series))


def drift_plot(series: dict[str, list[tuple[str, str, float]]], title: str, metric: str) -> bytes:
    """Per-prompt drift as horizontal bars (one group per prompt, one bar per run), coloured by prompt kind.

    series: run label -> [(prompt, kind, value)] in the same prompt order for every run.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, _drift_height(series)))
    _draw_drift(ax, series, metric)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


def compare_plot(preservation: dict[str, dict[str, float]], drift: dict[str, list[tuple[str, str, float]]],
                 title: str, metric: str) -> bytes:
    """Two runs side by side: preservation error per timestep (left) and held-out drift per prompt (right)."""
    plt = _pyplot()
    panels = [bool(preservation), bool(drift) and bool(next(iter(drift.values()), []))]
    n = max(1, sum(panels))
    fig, axes = plt.subplots(1, n, figsize=(6.4 * n, max(4.0, _drift_height(drift) if panels[1] else 4.0)),
                             squeeze=False)
    axes = list(axes.flat)
    if panels[0]:
        ax = axes.pop(0)
        _draw_preservation(ax, preservation)
        ax.set_title("preservation error per timestep (training)", fontsize=9)
    if panels[1]:
        ax = axes.pop(0)
        _draw_drift(ax, drift, metric)
        ax.set_title("drift on held-out preserved prompts", fontsize=9)
    for ax in axes:
        ax.text(0.5, 0.5, "neither run has preservation errors\nnor common held-out prompts", ha="center",
                va="center", transform=ax.transAxes)
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)


_EVAL_PANELS = (("fd", "Fréchet distance"), ("mmd2", "MMD² (unbiased)"), ("coverage", "coverage"),
                ("one_nn_accuracy", "1-NN accuracy"))
_EVAL_STYLE = {"reference": ("0.55", "base, other seeds"), "finetuned": ("tab:blue", "fine-tuned"),
               "plain": ("tab:red", "plain LoRA")}


def eval_plot(evaluation: dict) -> bytes:
    """One row per extractor, one panel per metric: each held-out prompt's value (dots) and the pooled value
    (dashed line) for every set compared with the base model."""
    plt = _pyplot()
    drift = evaluation["drift"]
    fig, axes = plt.subplots(len(drift), len(_EVAL_PANELS), figsize=(3.2 * len(_EVAL_PANELS), 2.6 * len(drift)),
                             squeeze=False)
    for row, (name, entry) in enumerate(drift.items()):
        prompts = entry["per_prompt"]
        xs = np.arange(1, len(prompts) + 1)
        for col, (key, title) in enumerate(_EVAL_PANELS):
            ax = axes[row][col]
            for model, (colour, label) in _EVAL_STYLE.items():
                if model not in entry["pooled"]:
                    continue
                ax.plot(xs, [p[model][key] for p in prompts], "o", color=colour, ms=4, label=label)
                ax.axhline(entry["pooled"][model][key], color=colour, ls="--", lw=1)
            if key == "one_nn_accuracy":
                ax.axhline(0.5, color="k", lw=0.5, ls=":")
            ax.set_title(f"{name}: {title}", fontsize=9)
            ax.set_xlabel("held-out prompt", fontsize=8)
            ax.set_xticks(xs)
            ax.tick_params(labelsize=7)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Feature-space drift from the base model per held-out prompt (dots) and pooled (dashed)", fontsize=10)
    fig.tight_layout()
    return _figure_bytes(fig)
