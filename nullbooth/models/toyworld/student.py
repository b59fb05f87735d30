"""Keeping a distilled LCM student for a new teacher folder, instead of distilling again.

Distillation reads these parts of the teacher: its UNet and noise schedule, its VAE encoder and scaling factor (the
training latents), and its tokenizer and text encoder (the caption embeddings). When a new teacher folder has exactly those (say, only its VAE decoder was fine-tuned),
the student distilled from the old one is the student this one would give; `reused_student` checks that and hands
it over, so `distill_toy_lcm(reuse_student=...)` can write a new LCM folder with the new teacher's shared parts.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.models.registry import EMBEDDED_MODELS, resolve_model_location
from nullbooth.models.toyworld.provenance import sha256_file
from nullbooth.models.toyworld.recipe import PROVENANCE


def _same_tensors(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def reused_student(source: str, teacher_folder: Path, pipe) -> tuple[Any, dict[str, Any]]:
    """(student UNet, the reused folder's provenance without its digests), refused unless `teacher_folder` holds
    every part the student was distilled from (the same UNet file, VAE encoder, text encoder, ...)."""
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    folder = Path(resolve_model_location(source) if source in EMBEDDED_MODELS else source).expanduser()
    where = f"LCM distillation: reuse_student {source!r}"
    try:
        prov = json.loads((folder / PROVENANCE).read_text(encoding="utf-8"))
        lcm = LatentConsistencyModelPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                             requires_safety_checker=False)
    except (OSError, ValueError, TypeError) as err:
        raise NullBoothError(f"{where}: not an LCM folder with provenance.json: {err}") from None
    if lcm.unet.config.time_cond_proj_dim is None or not isinstance(prov.get("teacher"), dict):
        raise NullBoothError(f"{where}: not a distilled LCM (no time_cond_proj_dim, or no teacher in its "
                             "provenance.json)")
    teacher_unet = sha256_file(teacher_folder / "unet" / "diffusion_pytorch_model.safetensors")
    # every part of the teacher that distillation reads, and every setting of those parts that changes the result
    same = {"UNet": prov["teacher"].get("unet_sha256") == teacher_unet,
            "VAE encoder": all(_same_tensors(getattr(lcm.vae, m), getattr(pipe.vae, m))
                               for m in ("encoder", "quant_conv")),
            "VAE scaling factor": lcm.vae.config.scaling_factor == pipe.vae.config.scaling_factor,
            "text encoder": _same_tensors(lcm.text_encoder, pipe.text_encoder),
            "tokenizer": lcm.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
            and lcm.tokenizer.model_max_length == pipe.tokenizer.model_max_length,
            "noise schedule": torch.equal(lcm.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)}
    if not all(same.values()):
        differ = ", ".join(name for name, ok in same.items() if not ok)
        raise NullBoothError(f"{where}: it was distilled from another teacher (not the same {differ}); "
                             "distill anew")
    config = {k: v for k, v in lcm.unet.config.items() if k != "_name_or_path"}  # where it was read from
    unet = UNet2DConditionModel.from_config(config)
    unet.load_state_dict(lcm.unet.state_dict())
    return unet, {k: v for k, v in prov.items() if k != "files"}
