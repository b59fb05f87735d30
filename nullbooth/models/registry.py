"""Where a model comes from: `model.path` resolved to a local diffusers folder or a hub id.

The embedded models are named in configs like hub ids: "tiny" and "tiny-lcm" (random weights, built on first
use) and "toy" (the toy-world model the project trains and ships, nullbooth/models/toyworld/weights). Anything
else is a local pipeline folder (it must hold model_index.json) or a hub id "org/name".
"""

from __future__ import annotations

from pathlib import Path

from nullbooth.errors import NullBoothError
from nullbooth.models.tiny import TINY_MODELS, ensure_tiny_model
from nullbooth.models.toyworld import WEIGHTS_DIR as TOY_WEIGHTS

# Embedded model name -> the backend it is made for.
EMBEDDED_MODELS: dict[str, str] = {**TINY_MODELS, "toy": "sd"}


def resolve_model_location(path: str) -> str:
    """A local folder or hub id for `model.path`; the embedded tiny models are built on first use."""
    if path in TINY_MODELS:
        return str(ensure_tiny_model(path))
    if path == "toy":
        if not (TOY_WEIGHTS / "model_index.json").is_file():
            raise NullBoothError(f"model.path: the shipped toy model is missing from {TOY_WEIGHTS}; reinstall the "
                                 "package, or train one with `nullbooth toy-model train OUT_DIR` and use that folder")
        return str(TOY_WEIGHTS)
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise NullBoothError(f"model.path: {path!r} is not a diffusers pipeline folder (no model_index.json)")
        return str(local)
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise NullBoothError(f"model.path: {path!r} is neither a local folder, a hub id (org/name) nor one of "
                             f"{', '.join(repr(n) for n in EMBEDDED_MODELS)}")
    return path
