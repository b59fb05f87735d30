"""The two training loops of the toy model: the VAE (reconstruction; or its decoder alone) and the UNet (DDPM
epsilon loss).

Both are plain seeded PyTorch loops over tensors held in memory; the recipe (`recipe.py`) wires them together.
The latent sampling, schedule and EMA helpers are shared with the LCM distillation (`distill.py`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

SD_BETAS: dict[str, Any] = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                            "beta_schedule": "scaled_linear"}


@dataclass
class LoopRecord:
    steps: int
    final_loss: float
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "final_loss": round(self.final_loss, 6), "seconds": round(self.seconds, 1)}


def cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `steps`."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def build_vae(image_size: int, channels: tuple[int, ...], groups: int, seed: int, latent_channels: int = 4):
    """An AutoencoderKL with `latent_channels` latent channels that downsamples by 2**(len(channels)-1)."""
    from diffusers import AutoencoderKL

    n = len(channels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                             up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=channels,
                             layers_per_block=1, latent_channels=latent_channels, norm_num_groups=groups, sample_size=image_size)


DECODER_PARTS = ("decoder.", "post_quant_conv.")  # what turns latents into pixels; the rest is the encoder


def train_vae(vae, images: torch.Tensor, *, steps: int, batch_size: int, lr: float, kl_weight: float, seed: int,
              progress: bool, decoder_only: bool = False) -> LoopRecord:
    """Fit the VAE to `images` (N,3,H,W in [0,1]) with L1+MSE reconstruction and a small KL term.

    L1 keeps edges sharper than MSE alone; the KL term only keeps the latent scale tame, as in SD's VAE.
    `decoder_only` fine-tunes the decoder alone, the encoder frozen and no KL term (the posterior does not move):
    the latent space stays exactly what it was, so a UNet trained on this VAE's latents stays valid, the way SD's
    fine-tuned decoders (sd-vae-ft-mse) were made.
    """
    from tqdm.auto import tqdm

    t0, gen = time.time(), torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # posterior sampling inside diffusers uses the global RNG
    params = [p for name, p in vae.named_parameters() if not decoder_only or name.startswith(DECODER_PARTS)]
    vae.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = cosine_schedule(opt, steps, warmup=max(1, steps // 20))
    vae.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="vae decoder" if decoder_only else "vae", disable=not progress)
    for _ in bar:
        x = images[torch.randint(0, len(images), (batch_size,), generator=gen)] * 2 - 1
        with torch.set_grad_enabled(not decoder_only):
            post = vae.encode(x).latent_dist
            z = post.sample()
        rec = vae.decode(z).sample
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x)
        if not decoder_only:
            loss = loss + kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.requires_grad_(True)
    vae.eval()
    return LoopRecord(steps, float(loss.item()), time.time() - t0)


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std of every image; the UNet samples latents from them each step, as SD training does."""
    means, stds = [], []
    for i in range(0, len(images), batch):
        post = vae.encode(images[i:i + batch] * 2 - 1).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruction_psnr(vae, images: torch.Tensor) -> float:
    """PSNR (dB) of the VAE's reconstructions (posterior mean) of `images`."""
    rec = (vae.decode(vae.encode(images * 2 - 1).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    return float(10 * torch.log10(1.0 / F.mse_loss(rec, images)))


def build_unet(latent_size: int, channels: tuple[int, ...], text_width: int, seed: int, latent_channels: int = 4,
               plain_levels: int = 0):
    """A UNet2DConditionModel; its `plain_levels` highest-resolution levels have no attention (ResNet blocks only),
    because self-attention over every latent pixel is what makes a fine latent grid slow on a CPU."""
    from diffusers import UNet2DConditionModel

    n = len(channels)
    down = ("DownBlock2D",) * plain_levels + ("CrossAttnDownBlock2D",) * (n - plain_levels)
    up = ("CrossAttnUpBlock2D",) * (n - plain_levels) + ("UpBlock2D",) * plain_levels
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(sample_size=latent_size, in_channels=latent_channels,
                                    out_channels=latent_channels,
                                    block_out_channels=channels, layers_per_block=1,
                                    down_block_types=down, up_block_types=up, cross_attention_dim=text_width,
                                    attention_head_dim=8, norm_num_groups=32)


@dataclass
class UNetData:
    """Everything the UNet loop reads: latent posteriors, the caption index of each image, caption embeddings."""

    mean: torch.Tensor  # (N,latent channels,h,w), unscaled
    std: torch.Tensor
    caption_ids: torch.Tensor  # (N,) index into `embeddings`
    embeddings: torch.Tensor  # (C, L, D); row `empty` is the empty prompt
    empty: int
    scaling_factor: float


def sample_latents(data: UNetData, idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents of images `idx`, drawn from their posteriors (a fresh draw each call, as SD training does)."""
    eps = torch.randn(data.mean[idx].shape, generator=gen)
    return (data.mean[idx] + data.std[idx] * eps) * data.scaling_factor


def train_unet(unet, data: UNetData, *, steps: int, batch_size: int, lr: float, ema_decay: float,
               caption_dropout: float, seed: int, progress: bool):
    """DDPM epsilon-prediction training; returns (EMA copy of the UNet, record).

    Captions are replaced by the empty prompt with probability `caption_dropout`, so the model also learns the
    unconditional prediction that classifier-free guidance subtracts.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    t0, gen = time.time(), torch.Generator().manual_seed(seed)
    noise_sched = DDPMScheduler(**SD_BETAS, clip_sample=False)
    ema = copy.deepcopy(unet).eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=1e-2)
    sched = cosine_schedule(opt, steps, warmup=max(1, steps // 20))
    unet.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(range(steps), desc="unet", disable=not progress)
    for step in bar:
        idx = torch.randint(0, len(data.mean), (batch_size,), generator=gen)
        latents = sample_latents(data, idx, gen)
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (batch_size,), generator=gen)
        caps = data.caption_ids[idx].clone()
        caps[torch.rand(batch_size, generator=gen) < caption_dropout] = data.empty
        pred = unet(noise_sched.add_noise(latents, noise, t), t, data.embeddings[caps]).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        ema_update(ema, unet, min(ema_decay, (1 + step) / (10 + step)))
        bar.set_postfix(loss=f"{loss.item():.4f}")
    unet.eval()
    return ema, LoopRecord(steps, float(loss.item()), time.time() - t0)


@torch.no_grad()
def ema_update(ema, model, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - decay)
