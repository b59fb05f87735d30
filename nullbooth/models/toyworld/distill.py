"""Latent consistency distillation (LCD): the toy-world LCM, distilled from the toy SD model on a CPU.

The method of the LCM paper (Luo et al. 2023, Algorithm 1) as diffusers' recipe for SD applies it
(examples/consistency_distillation/train_lcm_distill_sd_wds.py):

- teacher: the SD UNet, frozen. One DDIM step with classifier-free guidance, from t_{n+k} to t_n, over a
  skipping-step schedule: `num_ddim_timesteps` (50) of the 1000 training timesteps, t_i = (i + 1) k - 1 with k = 20,
  the very schedule LCMScheduler samples from (its `original_inference_steps`);
- student: the teacher's architecture plus `time_cond_proj_dim`, started from the teacher's weights. The new
  projection of the guidance embedding starts at zero, so the student begins as exactly the teacher;
- target: an EMA of the student (rate `ema_decay`);
- consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) with LCMScheduler's boundary-condition scalings
  (timestep_scaling 10), so f(x, 0) = x;
- loss: pseudo-Huber sqrt(d² + c²) - c, c = 0.001, in latent space.

Guidance: a guidance scale g is drawn per sample from [guidance_min, guidance_max] in the pipeline's convention (the
teacher's eps = eps_u + g (eps_c - eps_u)), and the student gets LCM's sinusoidal embedding of w = g - 1, exactly
what `LatentConsistencyModelPipeline(guidance_scale=g)` feeds it. So the LCM's guidance_scale means what the SD
model's does, and a config may use any g in the range.

Training data: the toy world's training images (never a held-out combination) encoded by the teacher's VAE, and their
captions encoded by its text encoder, both frozen. Everything is seeded.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.models.backends import guidance_scale_embedding
from nullbooth.models.cache import quiet_loading
from nullbooth.models.registry import EMBEDDED_MODELS, resolve_model_location
from nullbooth.models.toyworld import probe as probe_mod
from nullbooth.models.toyworld import text, trainers
from nullbooth.models.toyworld.provenance import (
    check_new_output,
    code_version,
    digest_tree,
    sha256_file,
    staged_folder,
    write_json,
)
from nullbooth.models.toyworld.recipe import PROVENANCE, world_training_set
from nullbooth.models.toyworld.student import reused_student

DISTILL_VERSION = 1
FROZEN_PARTS = ("vae", "text_encoder", "tokenizer")  # the teacher's, unchanged in the LCM folder


@dataclass
class DistillSettings:
    """Every knob of the distillation; all of it is recorded in provenance.json."""

    seed: int = 0
    steps: int = 4000  # about 34 minutes on 2 quiet cores at batch 32 (2.0 steps/s measured), data included
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 50
    weight_decay: float = 0.0
    ema_decay: float = 0.95  # the target network's EMA rate (diffusers' default)
    num_ddim_timesteps: int = 50  # skipping-step schedule: k = 1000 / 50 = 20
    guidance_min: float = 2.0  # guidance scale range, pipeline convention (w = g - 1 is embedded)
    guidance_max: float = 8.0
    huber_c: float = 0.001
    timestep_scaling: float = 10.0
    time_cond_proj_dim: int = 256
    num_images: int = 16000
    threads: int = 2  # torch threads
    # an LCM pipeline folder (or "toy-lcm") whose distilled UNet is kept instead of distilling again: allowed only
    # when this teacher has the UNet, VAE encoder and text encoder it was distilled from (all that distillation
    # reads), e.g. after the teacher's VAE decoder alone was fine-tuned
    reuse_student: str | None = None


# ---------------------------------------------------------------------------------------------------------------
# The math: boundary scalings, loss, the teacher's skipping-step DDIM solver


def boundary_scalings(t: torch.Tensor, timestep_scaling: float = 10.0,
                      sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(c_skip, c_out) of LCMScheduler's consistency function at timesteps `t`: c_skip(0) = 1, c_out(0) = 0."""
    scaled = timestep_scaling * t.to(torch.float32)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def pseudo_huber(pred: torch.Tensor, target: torch.Tensor, c: float) -> torch.Tensor:
    """Mean of sqrt((pred - target)² + c²) - c over all elements: L2-like below c, L1-like above."""
    return torch.mean(torch.sqrt((pred.float() - target.float()) ** 2 + c**2) - c)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, 1, 1, 1)


class SkippingDDIM:
    """Deterministic DDIM (eta = 0) over t_i = (i + 1) k - 1, i = 0 .. n - 1 (k = T / n): a step from index i goes
    to t_i - k (t = 0 from index 0, with alpha_bar_0, as DDIMScheduler does without set_alpha_to_one)."""

    def __init__(self, alphas_cumprod: torch.Tensor, num_ddim_timesteps: int):
        total = len(alphas_cumprod)
        self.k = total // num_ddim_timesteps
        self.alphas_cumprod = alphas_cumprod.to(torch.float32)
        self.timesteps = torch.arange(1, num_ddim_timesteps + 1) * self.k - 1
        self.prev_timesteps = (self.timesteps - self.k).clamp(min=0)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = _per_sample(self.alphas_cumprod[t])
        return a.sqrt() * latents + (1 - a).sqrt() * noise

    def predict_x0(self, eps: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = _per_sample(self.alphas_cumprod[t])
        return (x - (1 - a).sqrt() * eps) / a.sqrt()

    def step(self, eps: torch.Tensor, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x at t_{index} -> x at t_{index} - k, along the DDIM ODE given the noise prediction `eps`."""
        x0 = self.predict_x0(eps, self.timesteps[index], x)
        a_prev = _per_sample(self.alphas_cumprod[self.prev_timesteps[index]])
        return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


# ---------------------------------------------------------------------------------------------------------------
# One distillation step


@dataclass
class LCDBatch:
    latents: torch.Tensor  # clean, scaled latents
    noise: torch.Tensor
    index: torch.Tensor  # index into the solver's timesteps: the student starts at t_{n+k} = timesteps[index]
    guidance: torch.Tensor  # guidance scale g per sample (pipeline convention)
    text: torch.Tensor  # caption embeddings
    uncond: torch.Tensor  # empty-prompt embeddings, one per sample


def guidance_condition(guidance: torch.Tensor, dim: int) -> torch.Tensor:
    """The student's `timestep_cond`: LCM's embedding of w = g - 1, as the LCM pipeline computes it."""
    return guidance_scale_embedding(guidance - 1.0, dim)


def consistency_output(unet, solver: SkippingDDIM, x: torch.Tensor, t: torch.Tensor, text_emb: torch.Tensor,
                       cond: torch.Tensor, timestep_scaling: float) -> torch.Tensor:
    """f(x, t) = c_skip(t) x + c_out(t) x0(x, t): what LCMScheduler.step makes of the UNet's output (its denoised)."""
    eps = unet(x, t, encoder_hidden_states=text_emb, timestep_cond=cond).sample
    c_skip, c_out = boundary_scalings(t, timestep_scaling)
    return _per_sample(c_skip) * x + _per_sample(c_out) * solver.predict_x0(eps, t, x)


@torch.no_grad()
def teacher_step(teacher, solver: SkippingDDIM, x: torch.Tensor, index: torch.Tensor, text_emb: torch.Tensor,
                 uncond: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
    """The teacher's guided DDIM step from t_{index} to t_{index} - k (both branches in one batch)."""
    t = solver.timesteps[index]
    both = teacher(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([text_emb, uncond])).sample
    eps_c, eps_u = both.chunk(2)
    return solver.step(eps_u + _per_sample(guidance) * (eps_c - eps_u), index, x)


def lcd_loss(student, target, teacher, solver: SkippingDDIM, batch: LCDBatch,
             settings: DistillSettings) -> torch.Tensor:
    """The LCD loss of one batch: student f at t_{n+k} against target f at t_n of the teacher's step."""
    t_start = solver.timesteps[batch.index]
    t_end = solver.prev_timesteps[batch.index]
    x_start = solver.add_noise(batch.latents, batch.noise, t_start)
    cond = guidance_condition(batch.guidance, student.config.time_cond_proj_dim)
    pred = consistency_output(student, solver, x_start, t_start, batch.text, cond, settings.timestep_scaling)
    x_prev = teacher_step(teacher, solver, x_start, batch.index, batch.text, batch.uncond, batch.guidance)
    with torch.no_grad():
        tgt = consistency_output(target, solver, x_prev, t_end, batch.text, cond, settings.timestep_scaling)
    return pseudo_huber(pred, tgt, settings.huber_c)


def sample_batch(data: trainers.UNetData, solver: SkippingDDIM, settings: DistillSettings,
                 gen: torch.Generator) -> LCDBatch:
    n = settings.batch_size
    idx = torch.randint(0, len(data.mean), (n,), generator=gen)
    latents = trainers.sample_latents(data, idx, gen)
    noise = torch.randn(latents.shape, generator=gen)
    index = torch.randint(0, len(solver.timesteps), (n,), generator=gen)
    span = settings.guidance_max - settings.guidance_min
    guidance = settings.guidance_min + span * torch.rand(n, generator=gen)
    uncond = data.embeddings[data.empty].expand(n, -1, -1)
    return LCDBatch(latents, noise, index, guidance, data.embeddings[data.caption_ids[idx]], uncond)


# ---------------------------------------------------------------------------------------------------------------
# Models and the loop


def make_student(teacher, time_cond_proj_dim: int):
    """The teacher's UNet with `time_cond_proj_dim`, holding the teacher's weights; the new guidance projection is
    zero, so the student's first prediction is the teacher's (diffusers' recipe leaves it at its random init)."""
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in teacher.config.items() if k != "_name_or_path"}  # where the teacher was read from
    student = UNet2DConditionModel.from_config(config, time_cond_proj_dim=time_cond_proj_dim)
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any(".cond_proj." not in name for name in missing):
        raise RuntimeError(f"student UNet: unexpected weights {unexpected}, missing {missing}")
    with torch.no_grad():
        student.time_embedding.cond_proj.weight.zero_()
    return student


def train_lcd(student, teacher, solver: SkippingDDIM, data: trainers.UNetData, settings: DistillSettings,
              progress: bool) -> tuple[Any, dict[str, Any]]:
    """The distillation loop; returns (target network, record with the loss curve)."""
    from tqdm.auto import tqdm

    t0, cpu0, gen = time.time(), time.process_time(), torch.Generator().manual_seed(settings.seed + 11)
    teacher.eval().requires_grad_(False)
    target = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    sched = trainers.cosine_schedule(opt, settings.steps, settings.warmup)
    student.train()
    losses: list[float] = []
    bar = tqdm(range(settings.steps), desc="lcd", disable=not progress)
    for _ in bar:
        loss = lcd_loss(student, target, teacher, solver, sample_batch(data, solver, settings, gen), settings)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        trainers.ema_update(target, student, settings.ema_decay)
        losses.append(float(loss.item()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    student.eval()
    return target, {"steps": settings.steps, "final_loss": round(losses[-1], 6) if losses else None,
                    "loss_curve": _curve(losses), "seconds": round(time.time() - t0, 1),
                    "cpu_seconds": round(time.process_time() - cpu0, 1),  # ~ threads x seconds on a quiet machine
                    "steps_per_second": round(settings.steps / max(time.time() - t0, 1e-9), 3)}


def _curve(losses: list[float], points: int = 20) -> list[float]:
    """Mean loss over `points` equal spans of the run (single losses are noisy; the trend is what matters)."""
    if not losses:
        return []
    size = max(1, len(losses) // points)
    return [round(sum(chunk) / len(chunk), 6) for i in range(0, len(losses), size) if (chunk := losses[i:i + size])]


# ---------------------------------------------------------------------------------------------------------------
# The teacher, the data, the output folder


def load_teacher(teacher: str):
    """(folder, StableDiffusionPipeline in float32) of `teacher`: "toy", another embedded SD name, or a folder."""
    from diffusers import StableDiffusionPipeline

    folder = Path(resolve_model_location(teacher) if teacher in EMBEDDED_MODELS else teacher).expanduser()
    if not (folder / "model_index.json").is_file():
        raise NullBoothError(f"LCM distillation teacher {teacher!r}: not a diffusers pipeline folder "
                             f"(no {folder / 'model_index.json'}); expected 'toy' or a folder from "
                             "`nullbooth toy-model train`")
    quiet_loading()
    try:
        pipe = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, safety_checker=None,
                                                       requires_safety_checker=False)
    except (OSError, ValueError, TypeError) as err:
        raise NullBoothError(f"LCM distillation teacher {teacher!r}: cannot load it as a Stable Diffusion "
                             f"pipeline: {err}") from None
    if pipe.unet.config.time_cond_proj_dim is not None:
        raise NullBoothError(f"LCM distillation teacher {teacher!r}: its UNet already has time_cond_proj_dim (an "
                             "LCM); the teacher must be a Stable Diffusion model")
    if pipe.scheduler.config.prediction_type != "epsilon":
        raise NullBoothError(f"LCM distillation teacher {teacher!r}: prediction_type "
                             f"{pipe.scheduler.config.prediction_type!r}; expected 'epsilon'")
    return folder, pipe


def distill_data(pipe, settings: DistillSettings) -> tuple[trainers.UNetData, dict[str, Any]]:
    """Latent posteriors of the world's training images (teacher's VAE) and caption embeddings (its text encoder)."""
    t0 = time.time()
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images, captions = world_training_set(settings.seed, settings.num_images, size)
    embeddings, caption_ids, empty = text.caption_table(pipe.tokenizer, pipe.text_encoder, captions)
    mean, std = trainers.encode_latents(pipe.vae, images)
    data = trainers.UNetData(mean, std, caption_ids, embeddings, empty, float(pipe.vae.config.scaling_factor))
    return data, {"images": len(images), "unique_captions": empty, "image_size": size,
                  "seconds": round(time.time() - t0, 1)}


def _save_lcm(folder: Path, teacher_folder: Path, pipe, unet, settings: DistillSettings) -> None:
    """A stock LatentConsistencyModelPipeline folder (LCMScheduler over the distillation's schedule), UNet in fp16.
    The frozen parts (VAE, text encoder, tokenizer) are the teacher's files, copied byte for byte."""
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    scheduler = LCMScheduler.from_config(pipe.scheduler.config, original_inference_steps=settings.num_ddim_timesteps,
                                         timestep_scaling=settings.timestep_scaling)
    lcm = LatentConsistencyModelPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                         unet=unet.half(), scheduler=scheduler, safety_checker=None,
                                         feature_extractor=None, requires_safety_checker=False)
    lcm.save_pretrained(folder, safe_serialization=True)
    for part in FROZEN_PARTS:
        shutil.rmtree(folder / part)
        shutil.copytree(teacher_folder / part, folder / part)


def _copy_probe(teacher_folder: Path, folder: Path) -> bool:
    """The teacher's toy-world probe, so the LCM is a toy-world model too (prompts.is_toy_world)."""
    if not (teacher_folder / probe_mod.PROBE_WEIGHTS).is_file():
        return False
    for name in (probe_mod.PROBE_WEIGHTS, probe_mod.PROBE_JSON):
        shutil.copyfile(teacher_folder / name, folder / name)
    return True


def _teacher_record(teacher: str, folder: Path) -> dict[str, Any]:
    prov = folder / PROVENANCE
    record: dict[str, Any] = {"name": teacher, "folder": str(folder),
                              "provenance_sha256": sha256_file(prov) if prov.is_file() else None,
                              "unet_sha256": sha256_file(folder / "unet" / "diffusion_pytorch_model.safetensors")}
    if prov.is_file():
        meta = json.loads(prov.read_text(encoding="utf-8"))
        record["code_version"] = meta.get("code_version")
        record["recipe_version"] = meta.get("recipe_version")
    return record


def _distill_into(tmp: Path, teacher: str, settings: DistillSettings, progress: bool) -> dict[str, Any]:
    """Load, distill (or keep `reuse_student`'s UNet), save into `tmp`; returns provenance (without the file
    digests)."""
    t0 = time.time()
    folder, pipe = load_teacher(teacher)
    if settings.reuse_student:
        target, kept = reused_student(settings.reuse_student, folder, pipe)
        own = kept.get("settings")
        if not isinstance(own, dict) or set(own) - set(DistillSettings.__dataclass_fields__):
            raise NullBoothError(f"LCM distillation: reuse_student {settings.reuse_student!r}: its provenance.json "
                                 "does not hold this version's distillation settings; distill anew")
        settings = replace(DistillSettings(**own), reuse_student=settings.reuse_student,
                           threads=settings.threads)  # the student's own settings: its scheduler follows them
        data_record = kept.get("data")
        record = {**kept.get("distillation", {}), "reused_from": settings.reuse_student}
        lineage = {"lineage": {"student": settings.reuse_student, "provenance": kept}}
    else:
        data, data_record = distill_data(pipe, settings)
        solver = SkippingDDIM(pipe.scheduler.alphas_cumprod, settings.num_ddim_timesteps)
        student = make_student(pipe.unet, settings.time_cond_proj_dim)
        target, record = train_lcd(student, pipe.unet, solver, data, settings, progress)
        record, lineage = {**record, "exported": "target (EMA) network"}, {}
    _save_lcm(tmp, folder, pipe, target, settings)
    probe_copied = _copy_probe(folder, tmp)
    return {"recipe": "latent consistency distillation", "recipe_version": DISTILL_VERSION,
            "settings": asdict(settings), "teacher": _teacher_record(teacher, folder), "data": data_record,
            "distillation": record, "probe_copied": probe_copied,
            "code_version": code_version(), "wall_seconds": round(time.time() - t0, 1), **lineage}


def _check_settings(settings: DistillSettings) -> None:
    for name in ("steps", "batch_size", "num_images", "num_ddim_timesteps", "time_cond_proj_dim", "threads"):
        if getattr(settings, name) < 1:
            raise NullBoothError(f"LCM distillation: {name}={getattr(settings, name)}; expected a positive integer")
    if not 1.0 <= settings.guidance_min <= settings.guidance_max:
        raise NullBoothError(f"LCM distillation: guidance range [{settings.guidance_min}, {settings.guidance_max}]; "
                             "expected 1 <= guidance_min <= guidance_max")


def distill_toy_lcm(out_dir: str | Path, *, teacher: str = "toy", seed: int = 0, steps: int | None = None,
                    progress: bool = True, overwrite: bool = False, **overrides: Any) -> Path:
    """Distill the toy-world LCM from `teacher` into `out_dir` (a stock LatentConsistencyModelPipeline folder with
    the teacher's probe and provenance.json). `overrides` sets other `DistillSettings` fields (e.g. batch_size=4,
    num_images=32 for a quick test). Raises NullBoothError if `out_dir` exists and `overwrite` is False."""
    known = set(DistillSettings.__dataclass_fields__)
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise NullBoothError(f"LCM distillation: unknown setting(s) {unknown}; known: {sorted(known)}")
    settings = DistillSettings(seed=seed, **overrides)
    if steps is not None:
        settings.steps = steps
    _check_settings(settings)
    out = check_new_output(out_dir, overwrite, "toy LCM output")
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with staged_folder(out) as tmp:
            prov = _distill_into(tmp, teacher, settings, progress)
            write_json(tmp / PROVENANCE, {**prov, "files": digest_tree(tmp)})
    finally:
        torch.set_num_threads(threads)
    return out
