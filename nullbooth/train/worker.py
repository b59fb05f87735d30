"""One training replica: the frozen pipeline, the PEFT LoRA on its UNet, the projection, the optimizer and one step.

`Worker` holds no Ray state, so tests drive it in-process; `loop.py` runs one per Ray Train worker and adds DDP,
reporting and checkpoint hand-off.

Loss. SD: the DreamBooth denoising loss — MSE between the UNet's prediction and the noise (epsilon) or the velocity
(v-prediction), at timesteps drawn uniformly from [0, num_train_timesteps), on VAE latents of the images with the
(frozen) text encoder's embedding of the instance prompt. LCM: the same loss on the LCM UNet, called exactly as its
sampler calls it, with the guidance embedding `timestep_cond` of the configured guidance scale. A consistency-
distillation loss would need a teacher model and an ODE solver; the denoising loss fine-tunes the subject into the
UNet's noise predictor, which is what the LCM's consistency function is built on, and keeps the LCM's sampler,
step count and guidance embedding unchanged at generation. With prior preservation, class images join the batch
and their loss is added with weight `train.prior_loss_weight`.
"""

from __future__ import annotations

import contextlib
import random
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.models.backends import get_backend
from nullbooth.stats.manifest import Manifest
from nullbooth.storage import RunDir, png_bytes
from nullbooth.train.checkpoint import (
    TrainingState,
    rng_state,
    set_rng_state,
    signature_mismatches,
)
from nullbooth.train.data import StepDraw, _mix, draw_step, to_pixels
from nullbooth.train.distributed import all_reduce_mean
from nullbooth.train.full import FullAdapter, attach_full
from nullbooth.train.inputs import CheckedRun, load_statistics, statistics_reads
from nullbooth.train.preservation import PreservationMeter
from nullbooth.train.projection import (
    ProjectionPlan,
    TimestepBuckets,
    TimestepProjector,
    attach_global,
    effective_delta,
    lora_pairs,
)

WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class Worker:
    """Everything one replica needs to train; `rank`/`world` only choose its slice of each global batch."""

    def __init__(self, config: Config, plan: ProjectionPlan, instance_images: np.ndarray,
                 class_images: np.ndarray | None, device: torch.device | str = "cpu", rank: int = 0, world: int = 1,
                 signature: dict[str, Any] | None = None, measure: bool = True):
        self.config, self.plan, self.rank, self.world = config, plan, rank, world
        self.tc = config.train
        self.signature = signature or {}
        self._setup_model(device)
        self._setup_lora()
        self._setup_projection(measure)
        self._setup_optimizer()
        self._setup_data(instance_images, class_images)
        self.step = 0
        self.samples_seen = 0
        self.loss_history: list[float] = []
        self.prior_loss_history: list[float] = []
        self.eval_loss_initial: float | None = None
        self.resumed_from: list[int] = []
        _seed_globals(self.tc.seed, rank)

    # -- setup, in the order __init__ runs it ----------------------------------------------------------------------
    def _setup_model(self, device: torch.device | str) -> None:
        """The frozen pipeline on the device (fp16/bf16 weights under CUDA mixed precision) and the DDPM noiser."""
        from diffusers import DDPMScheduler

        tc = self.tc
        self.device = torch.device(device)
        self.backend = get_backend(self.config)
        use_amp = self.device.type == "cuda" and tc.mixed_precision != "no"
        self.amp_dtype = WEIGHT_DTYPES[tc.mixed_precision] if use_amp else None
        self.weight_dtype = self.amp_dtype or torch.float32  # cached: diffusers' `unet.dtype` walks every parameter
        self.pipe = self.backend.load_pipeline(self.device, dtype=self.weight_dtype)
        self.unet = self.pipe.unet
        for module in (self.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        self.model: torch.nn.Module = self.unet  # replaced by its DDP wrapper in a multi-worker run

    def _setup_lora(self) -> None:
        """The PEFT LoRA on every target: the same initial weights on every rank and for any worker count
        (DreamBooth's gaussian init, seeded by train.seed). train.adapter full: nothing yet (full.py's
        parametrizations need the bases, `_setup_projection` attaches them)."""
        from peft import LoraConfig

        tc = self.tc
        self.full: FullAdapter | None = None
        if tc.adapter == "full":
            self.lora_config, self.pairs, self.trainable = None, {}, {}
            return
        torch.manual_seed(tc.seed)
        self.unet.add_adapter(LoraConfig(r=tc.rank, lora_alpha=tc.alpha, lora_dropout=tc.dropout,
                                         init_lora_weights="gaussian", target_modules=list(self.plan.targets)))
        self.lora_config = self.unet.peft_config["default"].to_dict()
        self.trainable = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        for p in self.trainable.values():
            p.data = p.data.float()  # LoRA trains in float32 even when the frozen weights are fp16/bf16
        self.pairs = lora_pairs(self.unet, list(self.plan.targets))

    def _setup_projection(self, measure: bool) -> None:
        """The null-space constraint of the plan's mode on the protected pairs, and the preservation meter.
        Statistics are read through the driver's digests (inputs.CheckedRun) when the plan carries them."""
        plan = self.plan
        protected = {name: self.pairs[name] for name in plan.protected if name in self.pairs}  # LoRA only
        self.buckets = self.projector = None
        run = CheckedRun(self.config.run_dir, plan.files) if plan.files else RunDir(self.config.run_dir)
        manifest = self._manifest(run) if plan.has_statistics else None
        loaded = {(kind, which): load_statistics(run, manifest, kind, which)
                  for kind, which in statistics_reads(plan, manifest, measure)} if manifest is not None else {}
        if self.tc.adapter == "full":  # W₀ + ΔW(·U·Uᵀ), see full.py
            self.full, self.buckets, self.projector = attach_full(self.unet, plan, loaded, self.num_train_timesteps)
            self.trainable = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        elif plan.mode == "global" and protected:
            attach_global(protected, loaded[("bases", "global")])
            self.pairs = lora_pairs(self.unet, list(plan.targets))  # the parametrized modules
            self.trainable = {n: p for n, p in self.unet.named_parameters() if p.requires_grad}
        elif plan.mode == "timestep" and protected:
            self.buckets = TimestepBuckets(plan.timesteps, self.num_train_timesteps)
            self.projector = TimestepProjector({name: pair.down.weight for name, pair in protected.items()},
                                               {t: loaded[("bases", t)] for t in plan.timesteps})
        self.meter = self._meter(manifest, loaded) if measure and manifest is not None and plan.protected else None

    def _setup_optimizer(self) -> None:
        """AdamW over the trainable LoRA parameters (the parametrized originals in global mode), the LR schedule
        and, for fp16, the gradient scaler. The UNet is put in training mode (LoRA dropout on)."""
        from diffusers.optimization import get_scheduler

        tc = self.tc
        if tc.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.optimizer = torch.optim.AdamW(list(self.trainable.values()), lr=tc.learning_rate)
        self.lr_scheduler = get_scheduler(tc.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_train_steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None

    def _setup_data(self, instance_images: np.ndarray, class_images: np.ndarray | None) -> None:
        """VAE posteriors (mean, std) of the images and the prompt embeddings, computed once (VAE and text encoder
        are frozen); each step then only samples latents from the posteriors."""
        tc = self.tc
        self.instance = self._encode_images(instance_images)
        self.instance_text = self.backend.encode(self.pipe, [tc.instance_prompt])[0].detach()
        self.klass = self._encode_images(class_images) if class_images is not None else None
        self.class_text = (self.backend.encode(self.pipe, [tc.class_prompt])[0].detach()
                           if self.klass is not None else None)
        self.latent_shape = tuple(self.instance[0].shape[1:])

    def _manifest(self, run: RunDir) -> Manifest:
        from nullbooth.stats.manifest import read_manifest

        return read_manifest(run)

    def _meter(self, manifest: Manifest, loaded: dict) -> PreservationMeter:
        names = self.plan.protected
        modules = dict(self.unet.named_modules())
        weights = {name: self.full.base_weight(name) if self.full is not None else modules[name].base_layer.weight
                   for name in names}
        keep = lambda covs: {name: covs[name] for name in names}
        return PreservationMeter(weights, keep(loaded[("covariances", "global")]),
                                 {t: keep(loaded[("covariances", t)]) for t in manifest.timesteps})

    @torch.no_grad()
    def _encode_images(self, images: np.ndarray | None, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(mean, std) of the VAE posterior of every image, float32 on the device."""
        if images is None or len(images) == 0:
            return None
        vae = self.pipe.vae
        means, stds = [], []
        for start in range(0, len(images), chunk):
            pixels = to_pixels(images[start:start + chunk]).to(self.device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return torch.cat(means), torch.cat(stds)

    # -- one optimizer step ----------------------------------------------------------------------------------------
    def global_batch(self) -> int:
        return self.world * self.tc.train_batch_size * self.tc.gradient_accumulation_steps

    def draw(self, step: int) -> StepDraw:
        return draw_step(self.tc.seed, step, self.global_batch(), len(self.instance[0]), self.latent_shape,
                         self.num_train_timesteps, self.buckets, len(self.klass[0]) if self.klass is not None else 0,
                         start=self.samples_seen)

    def _latents(self, posterior: tuple[torch.Tensor, torch.Tensor], index: torch.Tensor, eps: torch.Tensor):
        mean, std = posterior
        vae = self.pipe.vae.config
        latents = mean[index] + std[index] * eps.to(self.device)
        shift = getattr(vae, "shift_factor", None) or 0.0
        return (latents - shift) * vae.scaling_factor

    def micro_loss(self, draw: StepDraw, model: torch.nn.Module | None = None) -> tuple[torch.Tensor, float, float]:
        """(weighted loss to backpropagate, instance loss, prior loss) of one micro-batch."""
        model = model or self.model
        b = len(draw.instance)
        latents = self._latents(self.instance, draw.instance.to(self.device), draw.latent_eps)
        noise, timesteps = draw.noise.to(self.device), draw.timesteps.to(self.device)
        text = self.instance_text.expand(b, -1, -1)
        if draw.klass is not None and self.klass is not None:
            latents = torch.cat([latents, self._latents(self.klass, draw.klass.to(self.device), draw.class_eps)])
            noise = torch.cat([noise, draw.class_noise.to(self.device)])
            timesteps = torch.cat([timesteps, draw.class_timesteps.to(self.device)])
            text = torch.cat([text, self.class_text.expand(b, -1, -1)])
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            raise NullBoothError(f"model.path: the scheduler's prediction_type {kind!r} is not supported for training "
                                 "(epsilon or v_prediction)")
        # backend.unet_forward's call, spelled out because a DDP wrapper hides the UNet's config (timestep_cond).
        cond = self.backend.timestep_cond(self.unet, len(noisy))
        autocast = (torch.autocast("cuda", dtype=self.amp_dtype) if self.amp_dtype is not None
                    else contextlib.nullcontext())
        with autocast:
            pred = model(noisy.to(self.weight_dtype), timesteps, encoder_hidden_states=text.to(self.weight_dtype),
                         timestep_cond=cond, return_dict=False)[0]
        instance_loss = F.mse_loss(pred[:b].float(), target[:b].float())
        prior_loss = F.mse_loss(pred[b:].float(), target[b:].float()) if len(pred) > b else None
        loss = instance_loss + self.tc.prior_loss_weight * prior_loss if prior_loss is not None else instance_loss
        return loss, instance_loss.item(), prior_loss.item() if prior_loss is not None else 0.0

    def train_step(self, draw: StepDraw | None = None) -> dict[str, float]:
        """One optimizer step over this rank's share of the global batch; returns the global-mean losses."""
        step = self.step + 1
        draw = draw or self.draw(step)
        if self.projector is not None:
            self.projector.snapshot()  # timestep mode projects the update A_new - A_old: remember A_old first
        totals = self._accumulate_gradients(draw)
        lr = self._apply_update(draw.bucket)
        totals = all_reduce_mean(totals, self.world)
        self.step, self.samples_seen = step, self.samples_seen + self.global_batch()
        self.loss_history.append(float(totals[0] + self.tc.prior_loss_weight * totals[1]))
        if self.klass is not None:
            self.prior_loss_history.append(float(totals[1]))
        return {"loss": self.loss_history[-1], "instance_loss": float(totals[0]), "prior_loss": float(totals[1]),
                "lr": lr, "bucket": draw.bucket}

    def _accumulate_gradients(self, draw: StepDraw) -> torch.Tensor:
        """Backward over this rank's micro-batches; DDP all-reduces the gradients on the last one only.
        Returns this rank's mean (instance loss, prior loss), float64."""
        tc = self.tc
        per_micro = self.world * tc.train_batch_size
        totals = torch.zeros(2, dtype=torch.float64)
        for m in range(tc.gradient_accumulation_steps):
            lo = m * per_micro + self.rank * tc.train_batch_size
            last = m == tc.gradient_accumulation_steps - 1
            sync = contextlib.nullcontext() if last or self.world == 1 else self.model.no_sync()
            with sync:
                loss, inst, prior = self.micro_loss(draw.slice(slice(lo, lo + tc.train_batch_size)))
                loss = loss / tc.gradient_accumulation_steps
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            totals += torch.tensor([inst, prior], dtype=torch.float64) / tc.gradient_accumulation_steps
        return totals

    def _apply_update(self, bucket: int | None) -> float:
        """Clip, step the optimizer, project (timestep mode), step the LR schedule; returns the LR this step used.

        The order matters:
        - fp16: `scaler.unscale_` before clipping, so that `max_grad_norm` bounds the true gradient norm and not the
          loss-scaled one (`scaler.step` then knows the gradients are unscaled and does not divide them again).
        - the LR is read before `lr_scheduler.step()`, which sets the LR of the NEXT step.
        - timestep mode: the projection comes right after `optimizer.step()`, because it projects the update that
          step made (A ← A_old + (A − A_old)·U_t·U_tᵀ, A_old from the snapshot in `train_step`), and before the
          parameters are read again (the collectives and checkpoint of loop.py, the next forward), so nothing
          ever sees an unprojected A. Global mode needs nothing here: A enters the forward pass as A·U·Uᵀ.
        """
        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        if self.tc.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.tc.max_grad_norm)
        lr = float(self.lr_scheduler.get_last_lr()[0])
        if self.scaler:
            self.scaler.step(self.optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.projector is not None:
            self.projector.project(bucket)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    @torch.no_grad()
    def eval_loss(self, n: int = 4) -> float:
        """The instance loss on a fixed batch (fixed images, noise, evenly spread timesteps), dropout off."""
        n = min(n, len(self.instance[0]))
        draw = draw_step(_mix(self.tc.seed, 0xE7A1), 1, n, len(self.instance[0]), self.latent_shape,
                         self.num_train_timesteps)
        draw.instance = torch.arange(n)
        draw.timesteps = torch.tensor([int((i + 0.5) * self.num_train_timesteps / n) for i in range(n)])
        self.unet.eval()
        try:
            return self.micro_loss(draw, model=self.unet)[1]
        finally:
            self.unet.train()

    # -- measurements ----------------------------------------------------------------------------------------------
    def preservation(self) -> dict | None:
        if self.meter is None:
            return None
        if self.full is not None:
            return self.meter.report(self.full.meter_deltas(self.plan.protected))
        return self.meter.report({name: effective_delta(self.pairs[name]) for name in self.plan.protected})

    def report(self, replica_max_abs_diff: float | None = None) -> dict[str, Any]:
        """The summary written as report.json: what was trained and how well it preserves."""
        tc, plan = self.tc, self.plan
        return {"step": self.step, "max_train_steps": tc.max_train_steps, "mode": plan.mode,
                "backend": self.config.model.backend, "model": self.config.model.path,
                "adapter": tc.adapter, "rank": tc.rank if tc.adapter == "lora" else None,
                "alpha": tc.alpha if tc.adapter == "lora" else None, "targets": list(plan.targets), "protected": plan.protected,
                "unprotected": plan.unprotected, "null_dims": plan.null_dims,
                "num_workers": self.world, "global_batch_size": self.global_batch(),
                "samples_seen": self.samples_seen, "loss_history": self.loss_history,
                "prior_loss_history": self.prior_loss_history,
                "final_loss": self.loss_history[-1] if self.loss_history else None,
                "eval_loss": {"initial": self.eval_loss_initial, "final": self.eval_loss()},
                "preservation": self.preservation(), "replica_max_abs_diff": replica_max_abs_diff,
                "resumed_from": self.resumed_from, "signature": self.signature}

    # -- resume ----------------------------------------------------------------------------------------------------
    def restore(self, state: TrainingState) -> None:
        """Continue from a checkpoint: LoRA parameters, optimizer, LR scheduler, gradient scaler, counters and RNG
        states."""
        diffs = signature_mismatches(state.signature, self.signature)
        if diffs:
            raise NullBoothError(f"train.name {self.tc.name!r}: its checkpoint was made with another configuration "
                                 f"({'; '.join(diffs)}); use another train.name or storage_path")
        with torch.no_grad():
            for name, param in self.trainable.items():
                param.copy_(state.trainable[name])
        self.optimizer.load_state_dict(state.optimizer)
        self.lr_scheduler.load_state_dict(state.lr_scheduler)
        if self.scaler is not None and state.scaler:  # fp16: the loss scale and its growth tracker
            self.scaler.load_state_dict(state.scaler)
        self.step, self.samples_seen = state.step, state.samples_seen
        report = state.report or {}
        self.loss_history = list(report.get("loss_history", []))
        self.prior_loss_history = list(report.get("prior_loss_history", []))
        self.eval_loss_initial = report.get("eval_loss", {}).get("initial")
        self.resumed_from = list(report.get("resumed_from", [])) + [state.step]
        if self.rank < len(state.rng):
            set_rng_state(state.rng[self.rank])

    def rng(self) -> dict[str, Any]:
        return rng_state()

    # -- validation images -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def validation_grid(self, prompts: list[str]) -> bytes:
        """PNG bytes of one row of images, one per prompt (prompt i sampled with seed sampling.seed + i)."""
        self.unet.eval()
        try:
            cond, uncond = self.backend.encode(self.pipe, list(prompts))
            generators = [torch.Generator().manual_seed(self.config.sampling.seed + i) for i in range(len(prompts))]
            images = self.backend.sample(self.pipe, cond, uncond, generators, output_type="np")
        finally:
            self.unet.train()
        tiles = [(np.clip(img, 0, 1) * 255).round().astype(np.uint8) for img in images]
        return png_bytes(np.concatenate(tiles, axis=1))  # side by side, left to right


def _seed_globals(seed: int, rank: int) -> None:
    """Seed torch/numpy/python per rank (LoRA dropout draws from torch's global generator)."""
    s = _mix(seed, 0xD20, rank)
    torch.manual_seed(s)
    np.random.seed(s % 2**32)
    random.seed(s)


