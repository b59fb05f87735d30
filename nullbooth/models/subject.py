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

SUBJECT_FORMAT_VERSION = 1  # bump when the drawing changes: the cache lives in "subject-v<FORMAT>"

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")

_TEAL = (18, 150, 155)
_TEAL_DARK = (8, 92, 98)
_ORANGE = (245, 130, 25)
_YELLOW = (250, 215, 40)
_YELLOW_DARK = (190, 150, 10)

# Dot centres and radii relative to the body ellipse (unit circle), fixed: they are part of the object's identity.
_DOTS = (
    (-0.55, -0.25, 0.13),
    (-0.1, -0.45, 0.12),
    (0.4, -0.2, 0.13),
    (-0.35, 0.3, 0.12),
    (0.15, 0.2, 0.14),
    (0.6, 0.4, 0.1),
    (-0.7, 0.15, 0.08),
    (0.05, 0.65, 0.1),
)

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
    """The teapot, upright, spout to the right, on a transparent square canvas of `side` pixels."""
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    s = side / 100.0  # drawn in a 100x100 coordinate system
    outline = max(1, round(1.5 * s))

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    # Handle (left): a thick ring, drawn first so the body covers its inner half.
    d.ellipse(box(8, 36, 38, 74), outline=_TEAL_DARK, width=round(6 * s))
    # Spout (right): a tapered polygon rising from the body.
    d.polygon([(p[0] * s, p[1] * s) for p in ((70, 58), (93, 30), (98, 33), (78, 72))], fill=_TEAL, outline=_TEAL_DARK)
    # Foot.
    d.rectangle(box(34, 82, 66, 89), fill=_TEAL_DARK)
    # Body.
    cx, cy, rx, ry = 50.0, 60.0, 28.0, 25.0
    d.ellipse(box(cx - rx, cy - ry, cx + rx, cy + ry), fill=_TEAL, outline=_TEAL_DARK, width=outline)
    for u, v, r in _DOTS:
        x, y, rr = cx + u * rx, cy + v * ry, r * rx
        d.ellipse(box(x - rr, y - rr, x + rr, y + rr), fill=_ORANGE)
    # Lid and knob.
    d.chord(box(32, 28, 68, 48), start=180, end=360, fill=_YELLOW, outline=_YELLOW_DARK, width=outline)
    d.rectangle(box(30, 37, 70, 40), fill=_YELLOW_DARK)
    d.ellipse(box(45, 21, 55, 31), fill=_YELLOW, outline=_YELLOW_DARK, width=outline)
    return img


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


def draw_subject_images(out_dir: str | os.PathLike, n: int = 6, size: int = 64) -> list[Path]:
    """Draw `n` images of the subject as `subject_XX.png` into `out_dir`; returns their paths in order."""
    if n < 1 or size < 8:
        raise NullBoothError(f"subject images: expected n >= 1 and size >= 8, got n={n}, size={size}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = out / f"subject_{i:02d}.png"
        draw_subject_image(i, size).save(path, format="PNG")
        paths.append(path)
    return paths


def ensure_subject_images() -> Path:
    """The cached directory of demo subject images, drawn on first use."""
    dest = cache_dir() / f"subject-v{SUBJECT_FORMAT_VERSION}"
    return build_once(dest, draw_subject_images)


def resolve_instance_dir(value: str) -> Path:
    """The instance-image directory a config names: "demo" is the drawn subject, anything else a local folder."""
    if value == "demo":
        return ensure_subject_images()
    path = Path(value).expanduser()
    if not path.is_dir():
        raise NullBoothError(f"instance images {value!r}: no such directory (use 'demo' for the drawn subject)")
    if not any(p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
        raise NullBoothError(f"instance images {value!r}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return path
