"""Scoring toy-world samples with the probe: does the image show what its caption names, is it the subject?

A caption is parsed back to its concepts (`world.parse_caption`); the probe reads the image. Concept accuracy is
the share of images whose object AND colour both match the caption: the test of whether a model (base or
fine-tuned) still draws what preserved and held-out prompts ask for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from nullbooth.errors import NullBoothError
from nullbooth.models.toyworld import probe as probe_mod
from nullbooth.models.toyworld.world import parse_caption


def generate(pipe, prompts: list[str], *, seed: int = 0, steps: int = 25, guidance: float = 5.0,
             size: int | None = None, batch: int = 16) -> list[Image.Image]:
    """One image per prompt; prompt i uses a generator seeded with seed + i, so any subset is reproducible."""
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    images: list[Image.Image] = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=gens, height=size,
                   width=size, output_type="pil")
        images.extend(out.images)
    return images


def concept_accuracy(pipe_or_images: Any, prompts: list[str], probe: probe_mod.ProbeNet,
                     **generate_kwargs: Any) -> dict[str, float]:
    """Shares of images whose object, colour, and both match their prompt, as read by the probe.

    `pipe_or_images`: images (PIL list or a (N,3,H,W) tensor in [0, 1], one per prompt, in order) or a pipeline
    to sample them from with `generate_kwargs`. Only prompts that name both an object and a colour count.
    """
    if hasattr(pipe_or_images, "unet"):
        images = generate(pipe_or_images, prompts, **generate_kwargs)
    else:
        images = pipe_or_images
    if len(images) != len(prompts):
        raise NullBoothError(f"concept accuracy: {len(images)} images for {len(prompts)} prompts; expected one each")
    wanted = [parse_caption(p) for p in prompts]
    keep = [i for i, (o, c, _) in enumerate(wanted) if o is not None and c is not None]
    if not keep:
        raise NullBoothError("concept accuracy: no prompt names both an object and a colour")
    if isinstance(images, torch.Tensor):
        preds = probe_mod.predict(probe, images[keep])
    else:
        preds = probe_mod.predict(probe, [images[i] for i in keep])
    obj = [preds[j]["object"] == wanted[i][0] for j, i in enumerate(keep)]
    col = [preds[j]["colour"] == wanted[i][1] for j, i in enumerate(keep)]
    n = len(keep)
    return {"object": sum(obj) / n, "colour": sum(col) / n, "both": sum(a and b for a, b in zip(obj, col)) / n,
            "n": n}


def subject_fidelity(images: Any, probe: probe_mod.ProbeNet) -> float:
    """Share of images the probe recognises as the demo subject (teal teapot, orange dots, yellow lid)."""
    preds = probe_mod.predict(probe, images)
    return sum(p["subject"] for p in preds) / len(preds)


def save_grid(images: list[Image.Image], captions: list[str], path: str | Path, cols: int = 4,
              cell: int = 128) -> Path:
    """A PNG grid of images (upscaled to `cell` px) with their captions underneath, for a person to look at."""
    rows = (len(images) + cols - 1) // cols
    text_h = 28
    grid = Image.new("RGB", (cols * cell, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, cap) in enumerate(zip(images, captions)):
        x, y = (i % cols) * cell, (i // cols) * (cell + text_h)
        grid.paste(img.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (x, y))
        words = cap.split()
        half = (len(words) + 1) // 2
        draw.text((x + 2, y + cell + 1), " ".join(words[:half]), fill="black")
        draw.text((x + 2, y + cell + 14), " ".join(words[half:]), fill="black")
    path = Path(path)
    grid.save(path)
    return path
