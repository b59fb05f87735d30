"""The toy world: seeded procedural images of coloured objects on backgrounds, with captions that name them.

A world image shows one object (6 kinds, one of them the demo subject's class `teapot`) in one of 8 colours on one
of 4 backgrounds, with position, size, rotation and mirroring jitter. Images are drawn at twice their size with
PIL and downscaled with LANCZOS, so edges are antialiased like photos and not aliased like masks. Everything is
deterministic given (seed, index): each image gets its own `random.Random`, the global RNG is never touched.

The DreamBooth demo subject, the teal teapot with orange dots and a yellow lid of `nullbooth/subject.py`, is
drawn with the same teapot silhouette as the world's teapots; no world caption produces it (teal is not a world
colour), so it is new to a model trained on the world.

A fixed eighth of the (object, colour, background) combinations is held out of model training: the drift
captions are made of them, so drift is measured on prompts the model composes rather than memorised.
"""

from __future__ import annotations

import colorsys
import math
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

from nullbooth.errors import NullBoothError

OBJECTS: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "teapot")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 30, 35),
    "green": (40, 170, 55),
    "blue": (35, 70, 225),
    "yellow": (245, 215, 30),
    "purple": (135, 45, 175),
    "orange": (250, 135, 10),
    "white": (245, 245, 245),
    "black": (12, 12, 12),
}
# Background id -> caption phrase. No phrase uses a colour word, so a caption's colour is unambiguous.
BACKGROUNDS: dict[str, str] = {
    "gray": "a plain gray background",
    "sky": "a sky background",
    "wood": "a striped wooden floor",
    "checker": "a dark checkered floor",
}

SUBJECT_COLOURS = {"body": (18, 150, 155), "dark": (8, 92, 98), "lid": (250, 215, 40), "lid_dark": (190, 150, 10)}
_SUBJECT_DOT = (245, 130, 25)
# Dot centres and radii relative to the body ellipse, as in nullbooth/subject.py: part of the subject's identity.
# Three large dots (subject format 2): the eight small ones of format 1 were 1-2 px at 32 px, too small for a person
# to see and blurred by the VAE's round trip (83 % still recognisable, against 100 % for these).
_DOTS = ((-0.5, -0.2, 0.3), (0.3, -0.3, 0.28), (0.0, 0.45, 0.3))
_SUBJECT_WITHOUT_DOTS = 0.25  # share of open-world teapots drawn as the subject minus its dots: the probe's near miss

DEFAULT_SIZE = 64
_SUPERSAMPLE = 2
_HELD_OUT_SEED = 20240611
_SUBJECT_SEED = 7919
_OPEN_SEED = 424242
_FULL_TEMPLATES = ("{a} {colour} {object} on {bg}", "a photo of {a} {colour} {object} on {bg}",
                   "a drawing of {a} {colour} {object} on {bg}")
# Captions that leave a concept out, so "a photo of a teapot" (the class prompt) is a prompt the model knows.
_PARTIAL_TEMPLATES = ("a photo of a {object}", "a photo of {a} {colour} {object}", "a photo of a {object} on {bg}")
PARTIAL_SHARE = 0.2


@dataclass(frozen=True)
class Scene:
    """What one world image shows; `caption` names all of it or, for partial captions, part of it."""

    object: str
    colour: str
    background: str
    caption: str


Combo = tuple[str, str, str]


def all_combos() -> list[Combo]:
    """Every (object, colour, background) combination, in a fixed order."""
    return [(o, c, b) for o in OBJECTS for c in COLOURS for b in BACKGROUNDS]


def held_out_combos() -> list[Combo]:
    """The fixed eighth of combinations kept out of model training.

    Each held-out combination has a distinct (object, colour) pair, so every pair and every background is still
    seen in training; the model has to compose a known pair with a known background.
    """
    rng = random.Random(_HELD_OUT_SEED)
    pairs = [(o, c) for o in OBJECTS for c in COLOURS]
    n = len(all_combos()) // 8
    chosen = rng.sample(pairs, n)
    backgrounds = list(BACKGROUNDS)
    return sorted((o, c, backgrounds[i % len(backgrounds)]) for i, (o, c) in enumerate(chosen))


def training_combos() -> list[Combo]:
    held = set(held_out_combos())
    return [c for c in all_combos() if c not in held]


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(combo: Combo, template: int = 0) -> str:
    """The full caption of `combo` with template number `template` (modulo the number of templates)."""
    o, c, b = combo
    return _FULL_TEMPLATES[template % len(_FULL_TEMPLATES)].format(a=_article(c), colour=c, object=o,
                                                                   bg=BACKGROUNDS[b])


def _partial_caption(combo: Combo, template: int) -> str:
    o, c, b = combo
    return _PARTIAL_TEMPLATES[template % len(_PARTIAL_TEMPLATES)].format(a=_article(c), colour=c, object=o,
                                                                         bg=BACKGROUNDS[b])


def parse_caption(text: str) -> tuple[str | None, str | None, str | None]:
    """(object, colour, background) named by a caption; None for a concept it does not name.

    The colour is the word right before the object word, so "sks teapot" has no colour.
    """
    words = text.lower().replace(",", " ").split()
    obj = next((w for w in words if w in OBJECTS), None)
    colour = None
    if obj is not None:
        i = words.index(obj)
        colour = words[i - 1] if i > 0 and words[i - 1] in COLOURS else None
    low = " ".join(words)
    bg = next((b for b, phrase in BACKGROUNDS.items() if phrase.split(" ", 1)[1] in low), None)
    return obj, colour, bg


def every_caption() -> list[str]:
    """Every caption any template makes for any combination (held-out ones included): the tokenizer's corpus."""
    full = [caption(c, t) for c in all_combos() for t in range(len(_FULL_TEMPLATES))]
    return full + [_partial_caption(c, t) for c in all_combos() for t in range(len(_PARTIAL_TEMPLATES))]


def preserved_prompts() -> list[str]:
    """The world's preserved prompts: two full captions of every training combination, then the class prompts.

    Real sentences in a fixed order, for `preserve.prompts_file: demo` with the toy model.
    """
    out = [caption(c, i + k) for i, c in enumerate(training_combos()) for k in (0, 1)]
    return out + [f"a photo of a {o}" for o in OBJECTS]


def drift_prompts(n: int = 64) -> list[str]:
    """`n` captions of held-out combinations (never in training), cycling through combinations and templates."""
    held = held_out_combos()
    return [caption(held[i % len(held)], i // len(held) + i) for i in range(n)]


def prompts_file_text() -> str:
    """The exact text of the shipped nullbooth/data/toy_prompts.txt: a comment header, the preserved prompts, then
    the 64 drift captions last, so that `preserve.holdout: 64` holds out exactly those (configs/toy.yaml)."""
    header = ("# Toy-world preserved prompts, generated by nullbooth.models.toyworld.world.prompts_file_text();\n"
              "# one prompt per line; do not edit by hand (a test checks it equals the generator's list).\n"
              "# The last 64 are captions of combinations the model never saw (configs/toy.yaml holds them out).\n")
    return header + "".join(p + "\n" for p in preserved_prompts() + drift_prompts(64))


# -------------------------------------------------------------------------------------------------------------
# Drawing
# -------------------------------------------------------------------------------------------------------------


def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A darker outline colour (a lighter one for black), so shapes keep an edge on similar backgrounds."""
    if sum(rgb) < 100:
        return (70, 70, 70)
    return tuple(round(v * 0.6) for v in rgb)  # type: ignore[return-value]


def _background(kind: str, rng: random.Random, side: int) -> Image.Image:
    img = Image.new("RGB", (side, side))
    d = ImageDraw.Draw(img)
    j = rng.randint(-8, 8)  # slight tone jitter, as lighting would give
    if kind == "gray":
        d.rectangle([0, 0, side, side], fill=(150 + j, 150 + j, 150 + j))
    elif kind == "sky":
        for y in range(side):
            t = y / side
            d.line([(0, y), (side, y)], fill=(round(110 + 80 * t) + j, round(175 + 50 * t) + j, 240))
    elif kind == "wood":
        w = side // 8
        off = rng.randrange(2 * w)
        d.rectangle([0, 0, side, side], fill=(150 + j, 105 + j, 70))
        for x in range(-2 * w + off, side, 2 * w):
            d.rectangle([x, 0, x + w - 1, side], fill=(115 + j, 80 + j, 55))
    elif kind == "checker":
        w = side // 8
        d.rectangle([0, 0, side, side], fill=(85 + j, 85 + j, 100 + j))
        for y in range(0, side, w):
            for x in range(0, side, w):
                if (x // w + y // w) % 2:
                    d.rectangle([x, y, x + w - 1, y + w - 1], fill=(55 + j, 55 + j, 65 + j))
    else:
        raise NullBoothError(f"toy world background: unknown {kind!r}, expected one of {list(BACKGROUNDS)}")
    return img


def draw_teapot(side: int, body: tuple[int, int, int], dark: tuple[int, int, int], lid: tuple[int, int, int],
                lid_dark: tuple[int, int, int], dots: tuple[int, int, int] | None = None) -> Image.Image:
    """The teapot on a transparent canvas, handle left, spout right: the world's teapots in one colour, and the demo
    subject (models/subject.py, `draw_subject_image` below) in teal with orange dots and a yellow lid."""
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    s = side / 100.0
    line = max(1, round(1.5 * s))

    def box(x0: float, y0: float, x1: float, y1: float) -> list[float]:
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    d.ellipse(box(8, 36, 38, 74), outline=dark, width=round(6 * s))
    d.polygon([(x * s, y * s) for x, y in ((70, 58), (93, 30), (98, 33), (78, 72))], fill=body, outline=dark)
    d.rectangle(box(34, 82, 66, 89), fill=dark)
    cx, cy, rx, ry = 50.0, 60.0, 28.0, 25.0
    d.ellipse(box(cx - rx, cy - ry, cx + rx, cy + ry), fill=body, outline=dark, width=line)
    if dots is not None:
        for u, v, r in _DOTS:
            x, y, rr = cx + u * rx, cy + v * ry, r * rx
            d.ellipse(box(x - rr, y - rr, x + rr, y + rr), fill=dots)
    d.chord(box(32, 28, 68, 48), start=180, end=360, fill=lid, outline=lid_dark, width=line)
    d.rectangle(box(30, 37, 70, 40), fill=lid_dark)
    d.ellipse(box(45, 21, 55, 31), fill=lid, outline=lid_dark, width=line)
    return img


def _star_points(cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = angle + k * math.pi / 5
        pts.append((cx + rr * math.sin(a), cy - rr * math.cos(a)))
    return pts


def _regular(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.sin(angle + 2 * math.pi * k / n), cy - r * math.cos(angle + 2 * math.pi * k / n))
            for k in range(n)]


def _draw_shape(kind: str, colour: tuple[int, int, int], rng: random.Random, side: int) -> Image.Image:
    """One object on a transparent canvas of `side` pixels, rotated as far as its symmetry makes visible."""
    if kind == "teapot":
        pot = draw_teapot(side, colour, _shade(colour), colour, _shade(colour))
        if rng.random() < 0.5:
            pot = pot.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return pot.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BICUBIC)
    img = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    d = ImageDraw.Draw(img)
    c, r, edge, width = side / 2, side * 0.45, _shade(colour), max(1, side // 40)
    angle = rng.uniform(-0.35, 0.35)
    if kind == "circle":
        d.ellipse([c - r, c - r, c + r, c + r], fill=colour, outline=edge, width=width)
    elif kind == "ring":
        d.ellipse([c - r, c - r, c + r, c + r], outline=edge, width=round(r * 0.42))
        d.ellipse([c - r + width, c - r + width, c + r - width, c + r - width], outline=colour,
                  width=round(r * 0.42) - 2 * width)
    elif kind == "square":
        d.polygon(_regular(c, c, r * 0.95, 4, math.pi / 4 + angle), fill=colour, outline=edge, width=width)
    elif kind == "triangle":
        d.polygon(_regular(c, c + r * 0.15, r * 1.05, 3, angle), fill=colour, outline=edge, width=width)
    elif kind == "star":
        d.polygon(_star_points(c, c + r * 0.05, r * 1.05, angle), fill=colour, outline=edge, width=width)
    else:
        raise NullBoothError(f"toy world object: unknown {kind!r}, expected one of {list(OBJECTS)}")
    return img


def _compose(background: str, thing_for_side, rng: random.Random, size: int, scale: tuple[float, float]):
    """Paste the object made by `thing_for_side(side)` onto a background at a jittered size and position."""
    side = size * _SUPERSAMPLE
    img = _background(background, rng, side)
    obj_side = round(side * rng.uniform(*scale))
    thing = thing_for_side(obj_side)
    slack = side - thing.width
    x = round(slack * rng.uniform(0.1, 0.9))
    y = round(slack * rng.uniform(0.1, 0.9))
    img.paste(thing, (x, y), thing)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def draw_scene(combo: Combo, rng: random.Random, size: int = DEFAULT_SIZE) -> Image.Image:
    """The image of one (object, colour, background) combination, jittered by `rng`."""
    o, c, b = combo
    if c not in COLOURS:
        raise NullBoothError(f"toy world colour: unknown {c!r}, expected one of {list(COLOURS)}")
    return _compose(b, lambda s: _draw_shape(o, COLOURS[c], rng, s), rng, size, (0.5, 0.8))


def sample_scene(seed: int, index: int, combos: list[Combo] | None = None, size: int = DEFAULT_SIZE,
                 partial_share: float = PARTIAL_SHARE) -> tuple[Image.Image, Scene]:
    """World image number `index` of stream `seed`: a combination from `combos` (default: all) and its caption.

    A share `partial_share` of captions leave the colour and/or the background out.
    """
    combos = combos if combos is not None else all_combos()
    rng = random.Random(seed * 1_000_003 + index)
    combo = combos[rng.randrange(len(combos))]
    if rng.random() < partial_share:
        text = _partial_caption(combo, rng.randrange(len(_PARTIAL_TEMPLATES)))
    else:
        text = caption(combo, rng.randrange(len(_FULL_TEMPLATES)))
    return draw_scene(combo, rng, size), Scene(combo[0], combo[1], combo[2], text)


def draw_subject_image(index: int, size: int = DEFAULT_SIZE, background: str | None = None,
                       dots: bool = True) -> Image.Image:
    """Image `index` of the demo subject (teal teapot, orange dots, yellow lid) on a world background.

    Pose (mirroring, tilt), size and position vary per image, as across photos of one object. `dots=False` draws
    the same image without the dots: the near miss that is not the subject.
    """
    rng = random.Random(_SUBJECT_SEED * 1_000_003 + index)
    bg = background or rng.choice(list(BACKGROUNDS))
    sc = SUBJECT_COLOURS

    def pot(side: int) -> Image.Image:
        img = draw_teapot(side, sc["body"], sc["dark"], sc["lid"], sc["lid_dark"], dots=_SUBJECT_DOT if dots else None)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BICUBIC)

    return _compose(bg, pot, rng, size, (0.55, 0.85))


def _open_colour(rng: random.Random) -> tuple[int, int, int]:
    """Any saturated colour, not only the world's eight."""
    h, sat, v = rng.random(), rng.uniform(0.4, 1.0), rng.uniform(0.35, 1.0)
    return tuple(round(255 * t) for t in colorsys.hsv_to_rgb(h, sat, v))  # type: ignore[return-value]


def _near(a: tuple[int, int, int], b: tuple[int, int, int], radius: int = 60) -> bool:
    return sum((x - y) ** 2 for x, y in zip(a, b)) < radius ** 2


def draw_open_image(index: int, size: int = DEFAULT_SIZE) -> tuple[Image.Image, str, str]:
    """Image `index` of the open world: a world object and background, but in any colour, teapots often with a lid
    and dots of other colours. Returns (image, object, background); it has no caption.

    These are the probe's negatives for "subject": a teapot must have the subject's teal body AND orange dots to
    count, not just be teapot-shaped in some colour no caption names. A share of the teapots are the near miss, the
    subject's teal body and yellow lid without its dots: without them the probe called 95 % of such teapots the
    subject, so "subject fidelity" measured the colours, not the dots. No open image has the subject's dots.
    """
    rng = random.Random(_OPEN_SEED * 1_000_003 + index)
    bg, obj = rng.choice(list(BACKGROUNDS)), rng.choice(OBJECTS)
    body = _open_colour(rng)
    dots = _open_colour(rng) if rng.random() < 0.5 else None
    if dots is not None and _near(body, SUBJECT_COLOURS["body"]) and _near(dots, _SUBJECT_DOT, 120):
        dots = None  # never the subject's look

    def thing(side: int) -> Image.Image:
        if obj != "teapot":
            return _draw_shape(obj, body, rng, side)
        if rng.random() < _SUBJECT_WITHOUT_DOTS:
            c = SUBJECT_COLOURS
            img = draw_teapot(side, c["body"], c["dark"], c["lid"], c["lid_dark"], dots=None)
        else:
            lid = _open_colour(rng) if rng.random() < 0.5 else body
            img = draw_teapot(side, body, _shade(body), lid, _shade(lid), dots=dots)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img.rotate(rng.uniform(-20, 20), resample=Image.Resampling.BICUBIC)

    return _compose(bg, thing, rng, size, (0.5, 0.85)), obj, bg
