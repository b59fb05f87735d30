"""Helpers shared by the benchmark scripts: an SD1.5-shaped random-weight model, a median timer, the machine.

Contract of every `benchmarks/bench_*.py` (what `run_all.py` calls):

    run(device: str = "cpu", quick: bool = False) -> list[dict]

Each dict is one row of benchmarks/RESULTS.md: `figure` (what was measured, e.g. "parallel vs serial eigh"),
`value` (the measured number, with its unit in `note` or the figure), `ratio` (the side-by-side ratio, or None for
absolute figures), `target` (the ratio the design aims for, as text, e.g. "≥ 1.5"; or None), `note` (medians,
sizes, anything a reader needs). `quick=True` is a smoke run: the smallest sizes that still exercise the code.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# The real Stable Diffusion 1.5 UNet config (unet/config.json of stable-diffusion-v1-5), the keys that shape it.
# Built with random weights: no download, same layer names and widths (cross-attention in 320/640/1280, text 768).
SD15_UNET_CONFIG: dict[str, Any] = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    center_input_sample=False,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    mid_block_scale_factor=1,
)
SD15_TEXT_WIDTH = 768
SD15_MAX_LENGTH = 77
SD15_VAE_SCALE = 8  # 512x512 images <-> 64x64 latents

# CPU-friendly default for the SD1.5-shaped benchmarks: 64x64 pixels = 8x8 latents (the UNet needs a multiple of 8).
CPU_RESOLUTION = 64


def build_sd15_unet(seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """An SD1.5-shaped UNet2DConditionModel with random weights (859.5M parameters; 3.4 GB in float32).

    `device="meta"` builds it without allocating weights (for shapes and layer tables only).
    """
    from diffusers import UNet2DConditionModel

    if str(device) == "meta":
        with torch.device("meta"):
            return UNet2DConditionModel(**SD15_UNET_CONFIG).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**SD15_UNET_CONFIG)
    if dtype != torch.float32 or str(device) != "cpu":
        unet = unet.to(device=device, dtype=dtype)
    return unet.eval()


def sd15_model_dir(text_layers: int = 2) -> Path:
    """A diffusers SD pipeline folder with the SD1.5-shaped UNet (random weights), cached like the tiny model.

    The UNet is full size; the text encoder has SD1.5's width (768) and length (77 tokens) but only `text_layers`
    layers, and the VAE has SD1.5's 8x downsampling with narrow channels: those two only feed the UNet, and keeping
    them small keeps a CPU benchmark's time in the UNet, which is what the SD1.5 figures are about. The tokenizer
    is the tiny model's BPE, lengthened to 77 tokens. Use it as `model.path` with `sampling.height/width`.
    """
    from nullbooth.models.cache import build_once, cache_dir

    dest = cache_dir() / f"sd15-shaped-t{text_layers}-v1"
    return build_once(dest, lambda tmp: _build_sd15_model(tmp, text_layers))


def _build_sd15_model(out: Path, text_layers: int) -> None:
    from diffusers import AutoencoderKL, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    from nullbooth.models.tiny import build_scheduler
    from nullbooth.models.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=SD15_TEXT_WIDTH, intermediate_size=4 * SD15_TEXT_WIDTH,
        num_hidden_layers=text_layers, num_attention_heads=12, max_position_embeddings=SD15_MAX_LENGTH,
        projection_dim=SD15_TEXT_WIDTH, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        text_encoder = CLIPTextModel(text_config).eval()
        torch.manual_seed(2)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(32, 32, 64, 64), sample_size=512,
        ).eval()
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=build_sd15_unet(seed=0),
        scheduler=build_scheduler("sd"), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)
    # The tokenizer must pad to the text encoder's 77 positions, as SD1.5's does.
    config_path = out / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["model_max_length"] = SD15_MAX_LENGTH
    config_path.write_text(json.dumps(config, indent=2))


def median_time(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of `fn()` in seconds over `repeats` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine(device: str = "cpu") -> str:
    """A short description of where a figure was measured: CPU model and cores, or the GPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ×{torch.cuda.device_count()}"
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cores} cores"


def row(figure: str, value: float | None, ratio: float | None = None, target: str | None = None,
        note: str = "") -> dict[str, Any]:
    """One result row in the shared contract."""
    return {"figure": figure, "value": value, "ratio": ratio, "target": target, "note": note}
