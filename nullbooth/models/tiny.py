"""The embedded tiny model: a random-weight, SD-architecture pipeline built offline by the package itself.

It lets the whole system (statistics, training, generation) run on a CPU in minutes with no download. Everything
is built deterministically from fixed seeds, independent of the caller's RNG state, so two builds are bit-identical
and a run's model fingerprint does not depend on which process or machine built the model.

Layout (what `diffusers.DiffusionPipeline.from_pretrained` reads):

    <out>/model_index.json, tokenizer/, text_encoder/, unet/, vae/, scheduler/

`sd` saves a `StableDiffusionPipeline` (PNDM scheduler like SD 1.5), `lcm` a `LatentConsistencyModelPipeline`
(`LCMScheduler`, UNet with `time_cond_proj_dim`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch

from nullbooth.errors import NullBoothError
from nullbooth.models.cache import build_once, cache_dir, quiet_loading
from nullbooth.models.tokenizer import MAX_LENGTH, build_tokenizer

# Bump when anything below changes what gets built: cached models live in "<name>-v<FORMAT>".
TINY_FORMAT_VERSION = 1

# Model name (as written in configs) -> backend.
TINY_MODELS: dict[str, str] = {"tiny": "sd", "tiny-lcm": "lcm"}

TEXT_WIDTH = 64  # text hidden size == UNet cross_attention_dim
# Separate seeds per component: the text encoder and VAE are identical across backends, and a change to one
# component's architecture does not reshuffle the weights of the others.
_SEED_TEXT_ENCODER = 1001
_SEED_UNET = 1002
_SEED_VAE = 1003


# ---------------------------------------------------------------------------------------------------------------
# Model components
# ---------------------------------------------------------------------------------------------------------------


def _seeded(seed: int, make: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Construct a module under a fixed seed without disturbing the caller's RNG state.

    Module constructors initialise from the global RNG, so a Generator cannot be passed in; fork_rng restores
    the global state afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = make()
    return module.eval()


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=TEXT_WIDTH,
        hidden_act="quick_gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,  # pooled output is taken at this id (not the legacy argmax)
        pad_token_id=tokenizer.pad_token_id,
    )
    return _seeded(_SEED_TEXT_ENCODER, lambda: CLIPTextModel(config))


def build_unet(backend: str):
    from diffusers import UNet2DConditionModel

    return _seeded(
        _SEED_UNET,
        lambda: UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=TEXT_WIDTH,
            attention_head_dim=8,
            norm_num_groups=32,
            # LCM conditions on the guidance scale through an extra embedding; SD has none.
            time_cond_proj_dim=256 if backend == "lcm" else None,
        ),
    )


def build_vae():
    from diffusers import AutoencoderKL

    return _seeded(
        _SEED_VAE,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=32,
            sample_size=32,  # one downsampling: 32x32 images <-> 16x16 latents
        ),
    )


# SD 1.5's scheduler betas; written out in full so diffusers does not rewrite deprecated defaults on load.
_SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def build_scheduler(backend: str):
    from diffusers import LCMScheduler, PNDMScheduler

    if backend == "lcm":
        return LCMScheduler(
            **_SD_BETAS,
            original_inference_steps=50,
            timestep_spacing="leading",
            steps_offset=1,
            set_alpha_to_one=True,
            clip_sample=False,
            prediction_type="epsilon",
        )
    return PNDMScheduler(
        **_SD_BETAS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type="epsilon",
    )


def _check_backend(backend: str) -> None:
    if backend not in ("sd", "lcm"):
        raise NullBoothError(f"tiny model backend: expected 'sd' or 'lcm', got {backend!r}")


def build_tiny_model(out_dir: str | os.PathLike, backend: str = "sd") -> Path:
    """Build the tiny pipeline for `backend` ("sd" or "lcm") and save it in diffusers layout into `out_dir`."""
    quiet_loading()  # before the pipelines' import, and transformers' "Writing model shards" bars are noise here
    from diffusers import LatentConsistencyModelPipeline, StableDiffusionPipeline

    _check_backend(backend)
    tokenizer = build_tokenizer()
    cls = LatentConsistencyModelPipeline if backend == "lcm" else StableDiffusionPipeline
    pipe = cls(
        vae=build_vae(),
        text_encoder=build_text_encoder(tokenizer),
        tokenizer=tokenizer,
        unet=build_unet(backend),
        scheduler=build_scheduler(backend),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = Path(out_dir)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def ensure_tiny_model(name: str) -> Path:
    """Path of the cached tiny model `name` ("tiny" or "tiny-lcm"), building it on first use."""
    if name not in TINY_MODELS:
        raise NullBoothError(f"tiny model: unknown name {name!r}, expected one of {sorted(TINY_MODELS)}")
    backend = TINY_MODELS[name]
    dest = cache_dir() / f"{name}-v{TINY_FORMAT_VERSION}"
    return build_once(dest, lambda tmp: build_tiny_model(tmp, backend))
