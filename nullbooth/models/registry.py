"""Where a model comes from: `model.path` resolved to a local diffusers folder or a hub id.

The embedded models are named in configs like hub ids: "tiny" and "tiny-lcm" (random weights, built on first
use), "toy" (the toy-world model the project trains and ships, nullbooth/models/toyworld/weights) and "toy-lcm"
(the LCM distilled from it: its own parts in nullbooth/models/toyworld/lcm_weights, put together with the toy
model's VAE, text encoder, tokenizer and probe in the cache on first use). Anything else is a local pipeline folder
(it must hold model_index.json) or a hub id "org/name".
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from nullbooth.config import check_model_path
from nullbooth.errors import NullBoothError
from nullbooth.models.cache import build_once, cache_dir
from nullbooth.models.tiny import TINY_MODELS, ensure_tiny_model
from nullbooth.models.toyworld import LCM_WEIGHTS_DIR, WEIGHTS_DIR
from nullbooth.models.toyworld.provenance import digest_tree, sha256_file

# Shipped model name -> (its folder, the command that makes one, backend).
SHIPPED_MODELS: dict[str, tuple[Path, str, str]] = {
    "toy": (WEIGHTS_DIR, "nullbooth toy-model train OUT_DIR", "sd"),
    "toy-lcm": (LCM_WEIGHTS_DIR, "nullbooth toy-model distill-lcm OUT_DIR", "lcm"),
}

# The parts of the toy LCM that are the toy SD model's own files, byte for byte (distillation trains only the UNet).
# The package ships them once, in the toy folder: the LCM's folder holds what distillation made (unet/, scheduler/,
# model_index.json, provenance.json), which keeps it within its 10 MB, and the whole pipeline folder is put together
# in the cache on first use.
TOY_LCM_SHARED_PARTS = ("vae", "text_encoder", "tokenizer", "probe.safetensors", "probe.json")

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
        return str(ensure_toy_lcm(folder) if path == "toy-lcm" else folder)
    check_model_path(path)  # checked with the config already; the folder may have gone since
    local = Path(path).expanduser()
    return str(local) if local.exists() else path


def ensure_toy_lcm(lcm_dir: Path = LCM_WEIGHTS_DIR, toy_dir: Path = WEIGHTS_DIR) -> Path:
    """The toy LCM's full pipeline folder in the cache: `lcm_dir`'s own parts plus the toy model's shared ones,
    named by the LCM's provenance digest and checked file by file against that provenance when put together."""
    prov_path = lcm_dir / "provenance.json"
    try:
        prov = json.loads(prov_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        prov = None
    if not isinstance(prov, dict) or not isinstance(prov.get("files"), dict):
        raise NullBoothError(f"model.path: toy-lcm: {prov_path} is missing or has no file digests; reinstall the "
                             "package, or distill one with `nullbooth toy-model distill-lcm OUT_DIR` and use that "
                             "folder")

    def assemble(tmp: Path) -> None:
        for part in sorted(p.name for p in lcm_dir.iterdir()):
            copy = shutil.copytree if (lcm_dir / part).is_dir() else shutil.copyfile
            copy(lcm_dir / part, tmp / part)
        for part in TOY_LCM_SHARED_PARTS:
            if (toy_dir / part).exists():
                copy = shutil.copytree if (toy_dir / part).is_dir() else shutil.copyfile
                copy(toy_dir / part, tmp / part)
        if digest_tree(tmp) != prov["files"]:
            raise NullBoothError(f"model.path: toy-lcm: the files of {lcm_dir} and {toy_dir} do not match the LCM's "
                                 "provenance.json (the toy model was changed or retrained after the distillation); "
                                 "reinstall the package, or distill a new one with `nullbooth toy-model distill-lcm "
                                 "OUT_DIR` and use that folder")

    return build_once(cache_dir() / f"toy-lcm-{sha256_file(prov_path)[:16]}", assemble)
