"""Test helper: a diffusers-format LoRA for the tiny UNet, made with PEFT the way a user's training would.

`b_std=0` gives a zeroed LoRA (lora_B = 0, PEFT's own init), which must leave every output bit-identical;
`b_std>0` a random nonzero one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from nullbooth.backends import resolve_model_location

TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


def make_lora(model_path: str, out_dir: str | Path, b_std: float, rank: int = 4, seed: int = 0) -> Path:
    """Save a LoRA on the cross-attention linears of `model_path`'s UNet into `out_dir`; returns `out_dir`."""
    unet = UNet2DConditionModel.from_pretrained(resolve_model_location(model_path), subfolder="unet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers)
    return Path(out_dir)
