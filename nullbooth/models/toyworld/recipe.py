"""The toy model's training recipe: probe, VAE, UNet, then one stock diffusers folder with provenance.

`train_toy_model(out_dir)` is the whole recipe. It writes into a temporary folder beside `out_dir` and renames it
at the end, so `out_dir` is either absent or complete. Everything is seeded; the step counts and sizes are
parameters, so a test can run the same code for a few steps at tiny sizes.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from nullbooth.errors import NullBoothError
from nullbooth.models.toyworld import probe as probe_mod
from nullbooth.models.toyworld import text, trainers, world
from nullbooth.models.toyworld.provenance import (
    check_new_output,
    code_version,
    digest_tree,
    staged_folder,
    write_json,
)

PROVENANCE = "provenance.json"
# 2: probe v2 (resolution augmentation, open-world negatives, 1200 steps), reuse_unet
# 3: token embeddings at unit scale (text.py), VAE trained on open-world images too (any colour, dotted teapots),
#    8 latent channels
# 4: the subject's three large dots (world.py), and the probe's near-miss negatives (the subject without its dots)
# 5: the VAE sees the subject's look too (vae_subject_images), and its decoder is fine-tuned alone at the end
#    (vae_decoder_steps), which keeps the latent space and so a kept UNet
RECIPE_VERSION = 5
# The VAE's subject images are world.draw_subject_image(SUBJECT_VAE_FIRST + i): never the demo's instance images
# (0..7) nor the probe's (below its pool size)
SUBJECT_VAE_FIRST = 100_000


@dataclass
class RecipeSettings:
    """Every knob of the recipe; all of it is recorded in provenance.json."""

    seed: int = 0
    image_size: int = 32
    num_images: int = 16000
    vae_channels: tuple[int, ...] = (32, 64, 64)
    vae_groups: int = 32
    vae_steps: int = 2200
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    vae_open_images: int = 8000  # open-world images (any colour) beside the world's, so the VAE can draw new colours
    vae_open_teapots: float = 0.5  # their share of teapots, half of them dotted: the hardest detail a subject shows
    # images of the subject's look in the VAE's data (never the UNet's): a real VAE reconstructs any photo, a user's
    # subject included. Without them the toy VAE turned the orange dots into a yellow-green smear (21.8 dB on the
    # subject against 29.8 dB on world images), so no UNet could draw them (benchmarks/RESULTS.md)
    vae_subject_images: int = 3000
    vae_decoder_steps: int = 1000  # then the decoder alone, encoder frozen (trainers.train_vae, decoder_only)
    vae_decoder_batch: int = 32
    vae_decoder_lr: float = 5e-4
    latent_channels: int = 8  # 4 (SD's) blurred 2-px dots away at 32 px; 8 costs the UNet only its first/last conv
    text_width: int = 128
    text_layers: int = 2
    token_std: float | None = 1.0  # the frozen encoder's token-embedding scale; None keeps CLIP's 0.02 (recipe v2)
    max_length: int = 16
    unet_channels: tuple[int, ...] = (64, 128)
    # UNet levels without attention, from the highest resolution: 1 makes a 16x16 latent grid affordable on a CPU
    # (the 16x16 experiment in benchmarks/RESULTS.md); the shipped model has attention at every level
    unet_plain_levels: int = 0
    unet_steps: int = 2500
    unet_batch: int = 64
    unet_lr: float = 1e-3
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    probe_steps: int = 1200
    probe_pool: int = 8000
    probe_test_images: int = 2000
    reuse_probe: str | None = None  # a folder whose probe files are copied instead of training a new probe
    reuse_vae: str | None = None  # a trained toy pipeline folder whose VAE is kept
    reuse_unet: str | None = None  # a trained toy pipeline folder whose UNet is kept (needs that folder's VAE too)
    threads: int = 2  # torch threads; 1 can be faster when other work shares a 2-core machine
    extra: dict[str, Any] = field(default_factory=dict)


def world_training_set(seed: int, num_images: int, image_size: int) -> tuple[torch.Tensor, list[str]]:
    """The training images, (N,3,H,W) in [0, 1] (training combinations only, never the held-out ones), and their
    captions; image i is `world.sample_scene(seed, i)`, so the same arguments give the same set."""
    combos = world.training_combos()
    arrays, captions = [], []
    for i in range(num_images):
        img, scene = world.sample_scene(seed, i, combos, size=image_size)
        arrays.append(np.asarray(img, dtype=np.uint8))
        captions.append(scene.caption)
    return _to_tensor(arrays), captions


def _open_images(settings: RecipeSettings) -> torch.Tensor:
    """Open-world images for the VAE only: a subject's new colours (teal, orange dots) must survive its round trip,
    as a real VAE, trained on every photo, draws any colour. None is coloured like the subject (world.py)."""
    want_teapots = round(settings.vae_open_images * settings.vae_open_teapots)
    want = {"teapot": want_teapots, "other": settings.vae_open_images - want_teapots}
    arrays, index = [], 0
    while any(want.values()):
        img, obj, _ = world.draw_open_image(index, size=settings.image_size)
        kind = "teapot" if obj == "teapot" else "other"
        if want[kind]:
            want[kind] -= 1
            arrays.append(np.asarray(img, dtype=np.uint8))
        index += 1
    return _to_tensor(arrays)


def subject_images(image_size: int, first: int, count: int) -> torch.Tensor:
    """`world.draw_subject_image(first + i)` for i < count, drawn at the world's size and resized to `image_size`
    with the resampling the instance-image loader uses (train/data.py): what the fine-tune will encode."""
    arrays = []
    for i in range(count):
        img = world.draw_subject_image(first + i)
        if img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(img, dtype=np.uint8))
    return _to_tensor(arrays)


def _vae_images(settings: RecipeSettings, images: torch.Tensor) -> torch.Tensor:
    """The VAE's data: the world's training images, open-world images and the subject's look."""
    subject = subject_images(settings.image_size, SUBJECT_VAE_FIRST, settings.vae_subject_images)
    extra = [t for t in (_open_images(settings), subject) if len(t)]
    return torch.cat([images, *extra]) if extra else images


def _to_tensor(arrays: list[np.ndarray]) -> torch.Tensor:
    if not arrays:
        return torch.zeros(0, 3, 1, 1)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def _text_side(settings: RecipeSettings, captions: list[str]):
    tokenizer = text.build_tokenizer(settings.max_length)
    encoder = text.build_text_encoder(tokenizer, width=settings.text_width, layers=settings.text_layers,
                                      seed=settings.seed + 1, token_std=settings.token_std)
    return (tokenizer, encoder, *text.caption_table(tokenizer, encoder, captions))


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**trainers.SD_BETAS, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                         timestep_spacing="leading", prediction_type="epsilon")


def _save_pipeline(folder: Path, vae, encoder, tokenizer, unet) -> None:
    """A stock StableDiffusionPipeline folder, weights in fp16 safetensors (loaders upcast with torch_dtype)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae.half(), text_encoder=encoder.half(), tokenizer=tokenizer,
                                   unet=unet.half(), scheduler=_scheduler(), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)


def _train_probe(settings: RecipeSettings, folder: Path, progress: bool) -> dict[str, Any]:
    if settings.reuse_probe:
        src = Path(settings.reuse_probe)
        probe_mod.load_probe(src)  # refuses a folder without a valid probe
        for name in (probe_mod.PROBE_WEIGHTS, probe_mod.PROBE_JSON):
            shutil.copyfile(src / name, folder / name)
        meta = json.loads((folder / probe_mod.PROBE_JSON).read_text(encoding="utf-8"))
        return {**meta["training"], "test_accuracy": meta["test_accuracy"], "reused_from": str(src)}
    net, record = probe_mod.train_probe(seed=settings.seed, steps=settings.probe_steps,
                                        pool_size=settings.probe_pool, progress=progress)
    test_seed = settings.seed + 1000
    acc = probe_mod.evaluate_probe(net, seed=test_seed, n=settings.probe_test_images)
    probe_mod.save_probe(net, folder, record, acc, {"seed": test_seed, "images": settings.probe_test_images})
    return {**record, "test_accuracy": acc}


def _vae(settings: RecipeSettings, images: torch.Tensor, progress: bool):
    """(VAE, training record): trained here or the one of `settings.reuse_vae`, then its decoder fine-tuned alone
    (`vae_decoder_steps`; the encoder, so the latent space, is the one trained or kept)."""
    if not settings.reuse_vae or settings.vae_decoder_steps:  # a kept VAE with no decoder steps needs no data
        images = _vae_images(settings, images)
    if settings.reuse_vae:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(settings.reuse_vae, subfolder="vae", torch_dtype=torch.float32)
        record: dict[str, Any] = {"reused_from": settings.reuse_vae}
    else:
        vae = trainers.build_vae(settings.image_size, settings.vae_channels, settings.vae_groups, settings.seed + 2,
                                 settings.latent_channels)
        record = trainers.train_vae(vae, images, steps=settings.vae_steps, batch_size=settings.vae_batch,
                                    lr=settings.vae_lr, kl_weight=settings.vae_kl_weight, seed=settings.seed + 3,
                                    progress=progress).as_dict()
    if settings.vae_decoder_steps:
        record["decoder"] = trainers.train_vae(vae, images, steps=settings.vae_decoder_steps,
                                               batch_size=settings.vae_decoder_batch, lr=settings.vae_decoder_lr,
                                               kl_weight=0.0, seed=settings.seed + 6, progress=progress,
                                               decoder_only=True).as_dict()
    return vae.eval(), record


def _unet(settings: RecipeSettings, data: trainers.UNetData, progress: bool):
    """(UNet, training record): trained here on `data`, or the one of `settings.reuse_unet` kept as it is."""
    if settings.reuse_unet:
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(settings.reuse_unet, subfolder="unet", torch_dtype=torch.float32)
        return unet.eval(), {"reused_from": settings.reuse_unet}
    latent = settings.image_size // 2 ** (len(settings.vae_channels) - 1)
    unet = trainers.build_unet(latent, settings.unet_channels, settings.text_width, settings.seed + 4,
                               settings.latent_channels, settings.unet_plain_levels)
    ema, record = trainers.train_unet(unet, data, steps=settings.unet_steps, batch_size=settings.unet_batch,
                                      lr=settings.unet_lr, ema_decay=settings.ema_decay,
                                      caption_dropout=settings.caption_dropout, seed=settings.seed + 5,
                                      progress=progress)
    return ema, record.as_dict()


def _train_models(settings: RecipeSettings, folder: Path, progress: bool) -> dict[str, Any]:
    """Data, VAE, latents, UNet; saves the pipeline into `folder` and returns what provenance records."""
    t0 = time.time()
    images, captions = world_training_set(settings.seed, settings.num_images, settings.image_size)
    tokenizer, encoder, emb, cap_ids, n_captions = _text_side(settings, captions)
    data_s = time.time() - t0
    vae, vae_rec = _vae(settings, images, progress)
    psnr = trainers.reconstruction_psnr(vae, images[:256])
    # on subject images the VAE never saw (the demo's instance images are the first 8 of them)
    subject_psnr = trainers.reconstruction_psnr(vae, subject_images(settings.image_size, 0, 64))
    mean, std = trainers.encode_latents(vae, images)
    scaling = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling)
    unet, unet_rec = _unet(settings, trainers.UNetData(mean, std, cap_ids, emb, n_captions, scaling), progress)
    _save_pipeline(folder, vae, encoder, tokenizer, unet)
    return {"data": {"images": len(images), "unique_captions": n_captions, "seconds": round(data_s, 1)},
            "vae": {**vae_rec, "psnr_db": round(psnr, 2), "subject_psnr_db": round(subject_psnr, 2),
                    "scaling_factor": scaling},
            "unet": {**unet_rec, "latent_size": mean.shape[-1]},
            "parameters": {"vae": _count(vae), "unet": _count(unet), "text_encoder": _count(encoder)}}


def _lineage(settings: RecipeSettings) -> dict[str, Any]:
    """Which parts were kept from earlier folders (reuse_*) and those folders' own provenance, so the shipped file
    tells the whole story of how its weights were made."""
    kept = {part: src for part, src in (("probe", settings.reuse_probe), ("vae", settings.reuse_vae),
                                        ("unet", settings.reuse_unet)) if src}
    if not kept:
        return {}
    runs = {}
    for src in sorted(set(kept.values())):
        path = Path(src) / PROVENANCE
        if path.is_file():
            runs[src] = {k: v for k, v in json.loads(path.read_text(encoding="utf-8")).items() if k != "files"}
    return {"lineage": {"kept": kept, "runs": runs}}


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _check_settings(settings: RecipeSettings) -> None:
    if settings.image_size % 2 ** (len(settings.vae_channels) - 1):
        raise NullBoothError(f"toy model recipe: image_size={settings.image_size} is not divisible by the VAE's "
                             f"downsampling factor {2 ** (len(settings.vae_channels) - 1)}")
    if not 0 <= settings.unet_plain_levels < len(settings.unet_channels):
        raise NullBoothError(f"toy model recipe: unet_plain_levels={settings.unet_plain_levels} must be at least 0 "
                             f"and below the UNet's {len(settings.unet_channels)} levels (one level needs attention)")
    for name in ("vae_subject_images", "vae_decoder_steps"):
        if getattr(settings, name) < 0:
            raise NullBoothError(f"toy model recipe: {name}={getattr(settings, name)}; expected 0 or more")
    if settings.vae_decoder_steps and settings.vae_decoder_batch < 1:
        raise NullBoothError(f"toy model recipe: vae_decoder_batch={settings.vae_decoder_batch}; expected 1 or more")


def train_toy_model(out_dir: str | os.PathLike, *, seed: int = 0, vae_steps: int = 2200, unet_steps: int = 2500,
                    probe_steps: int = 1200, progress: bool = True, overwrite: bool = False,
                    **overrides: Any) -> Path:
    """Train the toy-world model (probe, VAE, UNet; frozen random text encoder) and save it to `out_dir`.

    `overrides` sets any other `RecipeSettings` field (e.g. image_size=16, num_images=64 for a quick test).
    Returns `out_dir`. Raises NullBoothError if `out_dir` exists and `overwrite` is False.
    """
    known = set(RecipeSettings.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NullBoothError(f"toy model recipe: unknown setting(s) {unknown}; known: {sorted(known)}")
    settings = RecipeSettings(seed=seed, vae_steps=vae_steps, unet_steps=unet_steps, probe_steps=probe_steps,
                              **overrides)
    _check_settings(settings)
    out = check_new_output(out_dir, overwrite, "toy model output")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with staged_folder(out) as tmp:
            t0 = time.time()
            probe_info = _train_probe(settings, tmp, progress)
            t1 = time.time()
            models = _train_models(settings, tmp, progress)
            prov = {"recipe_version": RECIPE_VERSION, "settings": asdict(settings), "code_version": code_version(),
                    "probe": probe_info, **models,
                    "wall_seconds": {"probe": round(t1 - t0, 1), "models": round(time.time() - t1, 1),
                                     "total": round(time.time() - t0, 1)},
                    "held_out_combos": [list(c) for c in world.held_out_combos()],
                    **_lineage(settings), "files": digest_tree(tmp)}
            write_json(tmp / PROVENANCE, prov)
    finally:
        torch.set_num_threads(threads)
    return out
