"""Protected layers: which linears of the UNet NullBooth measures and constrains, and which side their keys are on.

A layer is named by its module path in `unet.named_modules()`. The config gives suffix patterns
(`attn2.to_q` matches every `...attn2.to_q`). Cross-attention `to_k`/`to_v` read the text encoder output, so their
keys are text-side (one covariance for the whole model); every other protected linear reads image tokens, whose
keys change with the timestep.
"""

from __future__ import annotations

import torch

from nullbooth.errors import NullBoothError

TEXT_SIDE_SUFFIXES = ("attn2.to_k", "attn2.to_v")


def matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern)


def key_side(name: str) -> str:
    """'text' when the layer's input is `encoder_hidden_states`, else 'image'."""
    return "text" if name.endswith(TEXT_SIDE_SUFFIXES) else "image"


def find_protected_layers(unet: torch.nn.Module, patterns: list[str],
                          key: str = "covariance.layers") -> dict[str, torch.nn.Linear]:
    """Module path -> linear for every pattern, in module order. Each pattern must match at least one linear."""
    linears = {name: module for name, module in unet.named_modules() if isinstance(module, torch.nn.Linear)}
    found: dict[str, torch.nn.Linear] = {}
    for pattern in patterns:
        hits = [name for name in linears if matches(name, pattern)]
        if not hits:
            raise NullBoothError(f"{key}: pattern {pattern!r} matches no linear layer of the UNet "
                                 "(patterns are suffixes of module paths such as 'attn2.to_q')")
        found.update({name: linears[name] for name in hits})
    return {name: found[name] for name in linears if name in found}


def layer_table(layers: dict[str, torch.nn.Linear]) -> dict[str, dict]:
    """The manifest's `layers` entry: name -> {"in_features": d, "side": "text"|"image"}."""
    return {name: {"in_features": int(layer.in_features), "side": key_side(name)} for name, layer in layers.items()}
