"""ALL the drift math of the report: how far the fine-tuned model's samples moved from the base model's.

Fine-tuned against base, same prompt, scheduler, steps, guidance and seed:
- latent_mse: mean over elements of (z_finetuned − z_base)² of the final latents, before the VAE decode;
- pixel_mse: the same over uint8 RGB values 0..255;
- pixel_psnr_db = 10·log10(255² / pixel_mse), None when pixel_mse = 0 (identical images; JSON holds no infinity).
Per prompt: averaged over its images. Over a set of prompts: the mean of each, the PSNR taken of the mean pixel_mse.
"""

from __future__ import annotations

import math

import numpy as np

DRIFT_DEFINITION = (
    "Fine-tuned against base, same prompt, scheduler, steps, guidance and seed. latent_mse: mean over elements of "
    "(z_finetuned - z_base)^2 of the final latents before the VAE decode; pixel_mse: the same over uint8 RGB values "
    "0..255; pixel_psnr_db = 10*log10(255^2 / pixel_mse), null when pixel_mse = 0 (identical images). Per prompt: "
    "averaged over its images. Means: over the prompts of that kind, the PSNR taken of the mean pixel_mse.")


def psnr_db(pixel_mse: float) -> float | None:
    """PSNR of uint8 images; None for identical images (infinite PSNR, which JSON cannot hold)."""
    return None if pixel_mse == 0 else 10.0 * math.log10(255.0 ** 2 / pixel_mse)


def mean_squared(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over elements of (a − b)², in float64 whatever the inputs' dtype (uint8 images would wrap around)."""
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def drift_metrics(base_latents: list[np.ndarray], tuned_latents: list[np.ndarray],
                  base_images: list[np.ndarray], tuned_images: list[np.ndarray]) -> dict[str, float | None]:
    """Drift of one prompt's fine-tuned samples against its base samples, averaged over the images."""
    latent = [mean_squared(t, b) for b, t in zip(base_latents, tuned_latents)]
    pixel_mse = float(np.mean([mean_squared(t, b) for b, t in zip(base_images, tuned_images)]))
    return {"latent_mse": float(np.mean(latent)), "pixel_mse": pixel_mse, "pixel_psnr_db": psnr_db(pixel_mse)}


def mean_drift(entries: list[dict]) -> dict | None:
    """The mean drift of several prompts' entries (each with latent_mse and pixel_mse); None for no entries."""
    if not entries:
        return None
    pixel_mse = float(np.mean([e["pixel_mse"] for e in entries]))
    return {"prompts": len(entries), "latent_mse": float(np.mean([e["latent_mse"] for e in entries])),
            "pixel_mse": pixel_mse, "pixel_psnr_db": psnr_db(pixel_mse)}
