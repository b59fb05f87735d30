"""Preserved prompts: the prompts whose cross-attention keys the LoRA update must leave untouched.

A prompt file is plain text, one prompt per line; blank lines and lines starting with '#' are ignored.
"""

from __future__ import annotations

import os
from pathlib import Path

from nullbooth.config import Config
from nullbooth.errors import NullBoothError

# Shipped with the package (see pyproject's package-data), used by the demo configs.
DEMO_PROMPTS_FILE: Path = Path(__file__).resolve().parent / "data" / "preserve_prompts.txt"
# The toy-world model's preserved prompts: captions of its world (written by nullbooth.models.toyworld.world).
TOY_PROMPTS_FILE: Path = Path(__file__).resolve().parent / "data" / "toy_prompts.txt"

# The demo's DreamBooth prompts: the rare token "sks" names the drawn subject, a teapot (models/subject.py).
DEMO_INSTANCE_PROMPT = "a photo of sks teapot"
DEMO_CLASS_PROMPT = "a photo of a teapot"


def read_prompts(path: str | os.PathLike, max_prompts: int | None = None) -> list[str]:
    """The prompts of `path` in file order, stripped, without blank and comment lines.

    `max_prompts` keeps only the first that many (None: all). Raises NullBoothError, naming the file, when it is
    missing, unreadable or holds no prompt.
    """
    path = Path(path)
    if max_prompts is not None and max_prompts < 1:
        raise NullBoothError(f"max_prompts for {path}: expected a positive integer or None, got {max_prompts!r}")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NullBoothError(f"prompts file {path}: not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise NullBoothError(f"prompts file {path}: cannot be read as UTF-8 text ({e})") from None
    prompts = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise NullBoothError(f"prompts file {path}: contains no prompts (only blank or '#' comment lines)")
    return prompts[:max_prompts] if max_prompts is not None else prompts


# The toy-world probe's weights file (models/toyworld/probe.py): a model folder that ships it is a toy-world model,
# the embedded `toy` / `toy-lcm` or one made by `nullbooth toy-model train OUT_DIR` (or `distill-lcm`).
TOY_PROBE_FILE = "probe.safetensors"
TOY_WORLD_MODELS = ("toy", "toy-lcm")  # the embedded toy-world models (models/registry.py ships them)


def is_toy_world(model_path: str) -> bool:
    """Whether `model.path` names a toy-world model. Those get the world's own captions as the demo prompts, the
    subject drawn in the world, and instance variants on the world's backgrounds: the embedded `toy` and `toy-lcm`,
    and equally a folder the recipe (or the LCM distillation) wrote."""
    return model_path in TOY_WORLD_MODELS or (Path(model_path).expanduser() / TOY_PROBE_FILE).is_file()


def resolve_prompts_file(value: str, model_path: str = "tiny") -> Path:
    """The prompts file a config names: "demo" is the shipped list for the model (the toy world's own captions for a
    toy-world model, the general list otherwise), anything else a local path."""
    if value == "demo":
        return TOY_PROMPTS_FILE if is_toy_world(model_path) else DEMO_PROMPTS_FILE
    path = Path(value).expanduser()
    if not path.is_file():
        raise NullBoothError(f"prompts file {value!r}: no such file (use 'demo' for the shipped prompt list)")
    return path


def preserved_prompts(config: Config) -> tuple[list[str], list[str]]:
    """(prompts measured, prompts held out): the file's first `max_prompts`, the last `holdout` of them held out."""
    path = resolve_prompts_file(config.preserve.prompts_file, config.model.path)
    prompts = read_prompts(path, config.preserve.max_prompts)
    holdout = config.preserve.holdout
    kept, held = (prompts[:-holdout], prompts[-holdout:]) if holdout else (prompts, [])
    if not kept:
        raise NullBoothError(f"preserve.holdout: holding out {holdout} of the {len(prompts)} prompts of {str(path)!r} "
                             "leaves none for the statistics; lower preserve.holdout or add prompts")
    return kept, held
