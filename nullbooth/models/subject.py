"""The synthetic DreamBooth subject of the demo: one distinctive teapot, drawn procedurally with PIL.

A teal teapot with a fixed pattern of orange polka dots, a yellow lid and knob. The object is the same in every
image (that is what DreamBooth learns); pose, size, position, mirroring and background vary per image, as they
would across real photos of one object. Drawing is deterministic (per-image seeded `random.Random`, no global
RNG), so the cached images and everything trained on them are reproducible.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from nullbooth.errors import NullBoothError
from nullbooth.models.cache import build_once, cache_dir
from nullbooth.models.toyworld.world import draw_teapot
from nullbooth.prompts import is_toy_world

SUBJECT_FORMAT_VERSION = 2  # bump when the drawing changes: the cache lives in "subject-v<FORMAT>"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_TEAL = (18, 150, 155)
_TEAL_DARK = (8, 92, 98)
_ORANGE = (245, 130, 25)
_YELLOW = (250, 215, 40)
_YELLOW_DARK = (190, 150, 10)

# Backgrounds that contrast with a teal object.
_BACKGROUNDS = (
    (236, 230, 215),
    (200, 210, 225),
    (245, 240, 240),
    (170, 120, 90),
    (120, 110, 140),
    (220, 190, 200),
    (90, 90, 85),
    (230, 220, 170),
)

_SUPERSAMPLE = 4  # draw large and downscale: antialiased edges at any output size


def _draw_teapot(side: int) -> Image.Image:
    """The teapot, upright, spout to the right, on a transparent square canvas of `side` pixels: the toy world's
    teapot silhouette in the subject's own colours, with its orange dots."""
    return draw_teapot(side, _TEAL, _TEAL_DARK, _YELLOW, _YELLOW_DARK, dots=_ORANGE)


def _background(rng: random.Random, side: int) -> Image.Image:
    base = rng.choice(_BACKGROUNDS)
    alt = tuple(max(0, min(255, c + rng.randint(-45, 45))) for c in base)
    img = Image.new("RGB", (side, side), base)
    d = ImageDraw.Draw(img)
    kind = rng.choice(("plain", "stripes", "checks", "gradient", "speckle", "table"))
    if kind == "stripes":
        w = rng.randint(side // 12, side // 5)
        for x in range(-side, 2 * side, 2 * w):
            d.polygon([(x, 0), (x + w, 0), (x + w + side // 3, side), (x + side // 3, side)], fill=alt)
    elif kind == "checks":
        w = rng.randint(side // 8, side // 4)
        for y in range(0, side, w):
            for x in range(0, side, w):
                if (x // w + y // w) % 2:
                    d.rectangle([x, y, x + w - 1, y + w - 1], fill=alt)
    elif kind == "gradient":
        for y in range(side):
            t = y / (side - 1)
            d.line([(0, y), (side, y)], fill=tuple(round(a * (1 - t) + b * t) for a, b in zip(base, alt)))
    elif kind == "speckle":
        for _ in range(side * 2):
            x, y, r = rng.randrange(side), rng.randrange(side), rng.randint(1, max(2, side // 60))
            d.ellipse([x - r, y - r, x + r, y + r], fill=alt)
    elif kind == "table":  # a wall above a tabletop the teapot stands on
        d.rectangle([0, int(side * rng.uniform(0.55, 0.75)), side, side], fill=alt)
    return img.filter(ImageFilter.GaussianBlur(radius=side / 200))


def draw_subject_image(index: int, size: int = 64) -> Image.Image:
    """Image number `index` of the subject: same teapot, varied pose and background."""
    rng = random.Random(7919 + index)
    side = size * _SUPERSAMPLE
    img = _background(rng, side)
    pot_side = round(side * rng.uniform(0.55, 0.9))
    pot = _draw_teapot(pot_side)
    if rng.random() < 0.5:
        pot = pot.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pot = pot.rotate(rng.uniform(-25.0, 25.0), resample=Image.Resampling.BICUBIC, expand=True)
    slack_x, slack_y = max(0, side - pot.width), max(0, side - pot.height)
    x = round(slack_x * rng.uniform(0.15, 0.85)) if slack_x else (side - pot.width) // 2
    y = round(slack_y * rng.uniform(0.15, 0.85)) if slack_y else (side - pot.height) // 2
    img.paste(pot, (x, y), pot)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def draw_subject_images(out_dir: str | os.PathLike, n: int = 6, size: int = 64, draw=None) -> list[Path]:
    """Draw `n` images of the subject as `subject_XX.png` into `out_dir` with `draw(index, size)` (default: this
    module's drawing); returns their paths in order."""
    draw = draw or draw_subject_image
    if n < 1 or size < 8:
        raise NullBoothError(f"subject images: expected n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"subject_{i:02d}.png"
        draw(i, size).save(path, format="PNG")
        paths.append(path)
    return paths


def ensure_subject_images(model_path: str = "tiny") -> Path:
    """The cached directory of demo subject images, drawn on first use. For the toy-world model the same teapot is
    drawn in its world (its backgrounds, its image size), so that the subject is the only new thing to learn."""
    if is_toy_world(model_path):
        from nullbooth.models.toyworld.world import draw_subject_image as draw_in_world

        dest = cache_dir() / f"toy-subject-v{SUBJECT_FORMAT_VERSION}"
        return build_once(dest, lambda tmp: draw_subject_images(tmp, n=8, draw=draw_in_world))
    dest = cache_dir() / f"subject-v{SUBJECT_FORMAT_VERSION}"
    return build_once(dest, draw_subject_images)


def resolve_instance_dir(value: str, model_path: str = "tiny") -> Path:
    """The instance-image directory a config names: "demo" is the drawn subject (for `model_path`), anything else
    a local folder."""
    if value == "demo":
        return ensure_subject_images(model_path)
    path = Path(value).expanduser()
    if not path.is_dir():
        raise NullBoothError(f"instance images {value!r}: no such directory (use 'demo' for the drawn subject)")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        raise NullBoothError(f"instance images {value!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return path
