"""Attention heat maps over generated images (PIL): one grid per mapped prompt.

Rows are the models (base, fine-tuned, plain LoRA); the first column the image, then one column per (word,
resolution) with the word's timestep-mean map over the image. A column shares one colour scale, 0 to the largest
value of that column's maps, so a map that concentrates (sums to 1 over fewer positions) shows brighter.
"""

from __future__ import annotations

import textwrap

import numpy as np
from PIL import Image, ImageDraw

from nullbooth.report.plots import _font
from nullbooth.storage import png_bytes

CELL = 128  # cell width in pixels (the height follows the image's aspect)
PAD, LABEL_W, HEADER_H, TITLE_H = 6, 150, 34, 24
ALPHA = 0.6  # weight of the heat map over the image


def _colours(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> uint8 RGB through matplotlib's 'inferno'."""
    from matplotlib import colormaps

    return (colormaps["inferno"](np.clip(values, 0.0, 1.0))[..., :3] * 255).round().astype(np.uint8)


def cell_size(image_shape: tuple[int, ...]) -> tuple[int, int]:
    """(width, height) of a cell showing an image of `image_shape` (H, W, ...)."""
    return CELL, max(1, round(CELL * image_shape[0] / image_shape[1]))


def _resized(image: np.ndarray) -> Image.Image:
    img = Image.fromarray(image)
    size = cell_size(image.shape)
    return img.resize(size, Image.NEAREST if size[0] >= img.width else Image.LANCZOS)  # no invented detail


def overlay(image: np.ndarray, heat: np.ndarray, scale: float) -> Image.Image:
    """`heat` (h, w), divided by `scale`, upsampled (bilinear) to the cell and blended over the image."""
    if heat.ndim != 2:  # a flattened map would be drawn as a column and smeared into horizontal stripes
        raise ValueError(f"attention heat map: expected an (h, w) grid, got shape {heat.shape}")
    base = _resized(image)
    smooth = Image.fromarray((heat / scale).astype(np.float32)).resize(base.size, Image.BILINEAR)
    colour = _colours(np.asarray(smooth))
    mixed = (1 - ALPHA) * np.asarray(base, dtype=np.float32) + ALPHA * colour.astype(np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8))


def grid_size(models: int, columns: int, image_shape: tuple[int, ...] = (1, 1)) -> tuple[int, int]:
    """(width, height) in pixels of a grid of `models` rows and `columns` map columns (plus the image column) over
    images of `image_shape` (H, W, ...)."""
    cw, ch = cell_size(image_shape)
    return (LABEL_W + (columns + 1) * (cw + PAD) + PAD, TITLE_H + HEADER_H + models * (max(ch, 84) + PAD) + PAD)


def attention_grid(entry: dict, labels: dict[str, str]) -> bytes:
    """The grid of one summarised target (report/attention.py: summarise); labels {model: row label}, in order."""
    models = [m for m in labels if m in entry["models"]]
    first = entry["models"][models[0]]["words"]
    columns = [(word, shape) for word in first for shape in first[word]["mean"]]
    scales = {c: max(float(entry["models"][m]["words"][c[0]]["mean"][c[1]].max()) for m in models) for c in columns}
    shape = entry["models"][models[0]]["image"].shape
    width, height = grid_size(len(models), len(columns), shape)
    row_h = max(cell_size(shape)[1], 84)  # room for the row label
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font, small = _font(13), _font(11)
    draw.text((PAD, 4), f"{entry['prompt']!r}, seed {entry['seed']}", fill="black", font=_font(15))
    xs = [LABEL_W + i * (CELL + PAD) for i in range(len(columns) + 1)]
    draw.text((xs[0], TITLE_H + 8), "image", fill="black", font=font)
    for x, (word, (h, w)) in zip(xs[1:], columns):
        draw.text((x, TITLE_H + 2), word, fill="black", font=font)
        draw.text((x, TITLE_H + 17), f"{h}x{w}", fill="#555555", font=small)
    for r, model in enumerate(models):
        y = TITLE_H + HEADER_H + r * (row_h + PAD)
        row = entry["models"][model]
        shares = "\n".join(textwrap.wrap(", ".join(f"{w} {100 * v['share']:.1f}%" for w, v in row["words"].items()),
                                         22)[:4])
        draw.text((PAD, y + 2), labels[model], fill="black", font=font)
        draw.multiline_text((PAD, y + 20), "share:\n" + shares, fill="#555555", font=small, spacing=2)
        canvas.paste(_resized(row["image"]), (xs[0], y))
        for x, column in zip(xs[1:], columns):
            canvas.paste(overlay(row["image"], row["words"][column[0]]["mean"][column[1]], scales[column]), (x, y))
    return png_bytes(canvas)
