"""Where a model comes from: `model.path` resolved to a local diffusers folder or a hub id.

The embedded models are named in configs like hub ids: "tiny" and "tiny-lcm" (random weights, built on first
use), "toy" (the toy-world model the project trains and ships, nullbooth/models/toyworld/weights) and "toy-lcm"
(the LCM distilled from it, nullbooth/models/toyworld/lcm_weights). Anything else is a local pipeline folder (it
must hold model_index.json) or a hub id "org/name".
"""

from __future__ import annotations

from pathlib import Path

from nullbooth.config import check_model_path
from nullbooth.errors import NullBoothError
from nullbooth.models.tiny import TINY_MODELS, ensure_tiny_model
from nullbooth.models.toyworld import LCM_WEIGHTS_DIR, WEIGHTS_DIR

# Shipped model name -> (its folder, the command that makes one, backend).
SHIPPED_MODELS: dict[str, tuple[Path, str, str]] = {
    "toy": (WEIGHTS_DIR, "nullbooth toy-model train OUT_DIR", "sd"),
    "toy-lcm": (LCM_WEIGHTS_DIR, "nullbooth toy-model distill-lcm OUT_DIR", "lcm"),
}

# Embedded model name -> the backend it is made for (the names are config.EMBEDDED_MODEL_NAMES, which the config
# checks know without importing the models).
EMBEDDED_MODELS: dict[str, str] = {**TINY_MODELS, **{name: shipped[2] for name, shipped in SHIPPED_MODELS.items()}}


def resolve_model_location(path: str) -> str:
    """A local folder or hub id for `model.path`; the embedded tiny models are built on first use."""
    if path in TINY_MODELS:
        return str(ensure_tiny_model(path))
    if path in SHIPPED_MODELS:
        folder, command, _ = SHIPPED_MODELS[path]
        if not (folder / "model_index.json").is_file():
            raise NullBoothError(f"model.path: the shipped {path} model is missing from {folder}; reinstall the "
                                 f"package, or make one with `{command}` and use that folder")
        return str(folder)
    check_model_path(path)  # checked with the config already; the folder may have gone since
    local = Path(path).expanduser()
    return str(local) if local.exists() else path
