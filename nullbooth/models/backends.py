"""Model backends: Stable Diffusion 1.x (`sd`) and Latent Consistency Models (`lcm`).

A backend knows how to load a model's pipeline with the configured sampler, which timesteps that sampler visits,
how prompts become text keys, and how to call the UNet (LCM adds the guidance embedding `timestep_cond`).
Everything else in the project goes through it, so the statistics, the training and the generation all see the
same scheduler, the same trajectories and the same UNet call.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
import transformers

# Importing diffusers' pipelines touches CLIPImageProcessor (for safety checkers we never load) and, without
# torchvision, transformers warns about it in every process; only errors from transformers are worth showing.
transformers.logging.set_verbosity_error()

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LatentConsistencyModelPipeline,
    LCMScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.models.cache import quiet_loading
from nullbooth.models.registry import resolve_model_location

# Sampler name -> (diffusers class, overrides applied on top of the model's own scheduler config).
SCHEDULER_CLASSES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                              "use_karras_sigmas": False}),
    "dpm++2m-karras": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                     "use_karras_sigmas": True}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def model_fingerprint(unet: torch.nn.Module) -> str:
    """A short hash of the UNet's config and weights: a run's statistics belong to exactly one model."""
    import hashlib

    # `_name_or_path` is where the files were read from (a cache folder, or `.../unet` when loaded through a
    # pipeline): not part of the model, so the same UNet gets the same fingerprint however it was loaded.
    config = {k: v for k, v in dict(unet.config).items() if k != "_name_or_path"}
    digest = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(unet.state_dict().items()):
        digest.update(name.encode())
        # A strided sample of every tensor keeps this fast for SD1.5 (860M parameters) yet sensitive to any
        # fine-tune, which moves essentially every weight.
        flat = tensor.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to(torch.float32).cpu()
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


class Backend:
    """Shared logic; `SDBackend` and `LCMBackend` fill in the differences."""

    name = ""
    pipeline_class: type = StableDiffusionPipeline

    def __init__(self, config: Config):
        self.config = config
        self.model = config.model
        self.sampling = config.sampling
        self._location: str | None = None

    # -- model location and scheduler ------------------------------------------------------------------------------
    @property
    def location(self) -> str:
        if self._location is None:
            self._location = resolve_model_location(self.model.path)
        return self._location

    def scheduler_config(self) -> dict[str, Any]:
        """The model's own scheduler config (from its `scheduler/` subfolder)."""
        try:
            config = SCHEDULER_CLASSES["ddim"][0].load_config(self.location, subfolder="scheduler",
                                                              revision=self.model.revision)
        except (OSError, ValueError) as err:
            raise NullBoothError(f"model.path: cannot read the scheduler config of {self.model.path!r}: {err}") from None
        return dict(config)

    def make_scheduler(self, base_config: dict[str, Any] | None = None) -> SchedulerMixin:
        """The configured sampler, built with the real diffusers class from the model's scheduler config."""
        cls, overrides = SCHEDULER_CLASSES[self.sampling.scheduler]
        return cls.from_config(base_config if base_config is not None else self.scheduler_config(), **overrides)

    def set_timesteps(self, scheduler: SchedulerMixin) -> None:
        scheduler.set_timesteps(self.sampling.num_inference_steps)

    def timestep_plan(self, scheduler: SchedulerMixin | None = None) -> list[int]:
        """Exactly the timesteps `set_timesteps` gives, in sampling order, as integers.

        Samplers on "leading"/"trailing" spacing (SD and LCM checkpoints) give integral timesteps; a fractional one
        (e.g. Euler on "linspace" spacing) is labelled by its nearest integer.
        """
        scheduler = scheduler or self.make_scheduler()
        self.set_timesteps(scheduler)
        return [int(round(float(t))) for t in scheduler.timesteps]

    # -- pipeline ------------------------------------------------------------------------------------------------
    def device(self, has_gpu: bool | None = None) -> torch.device:
        if self.model.device == "cpu":
            return torch.device("cpu")
        if self.model.device == "cuda":
            if not torch.cuda.is_available():
                raise NullBoothError("model.device: 'cuda' was asked for but this process sees no GPU")
            return torch.device("cuda")
        return torch.device("cuda" if torch.cuda.is_available() and has_gpu is not False else "cpu")

    def load_pipeline(self, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        """The diffusers pipeline with the configured sampler, checked to fit this backend."""
        dtype = dtype or DTYPES[self.model.dtype]
        kwargs: dict[str, Any] = {"dtype": dtype, "revision": self.model.revision}
        if self.pipeline_class is StableDiffusionPipeline:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        else:
            kwargs.update(safety_checker=None)
        quiet_loading()
        try:
            pipe = self.pipeline_class.from_pretrained(self.location, **kwargs)
        except (OSError, ValueError, EnvironmentError) as err:
            raise NullBoothError(f"model.path: cannot load {self.model.path!r} as a {self.name} pipeline: {err}") from None
        self.check_unet(pipe.unet)
        pipe.scheduler = self.make_scheduler(dict(pipe.scheduler.config))
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device)

    def check_unet(self, unet: torch.nn.Module) -> None:
        if not any(".attn2." in name for name, _ in unet.named_modules()):
            raise NullBoothError(f"model.path: the UNet of {self.model.path!r} has no cross-attention (attn2) layers; "
                                 "NullBooth protects cross-attention and cannot work on it")

    def image_size(self, pipe) -> tuple[int, int]:
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return self.sampling.height or native, self.sampling.width or native

    # -- text and UNet -------------------------------------------------------------------------------------------
    @property
    def uses_guidance(self) -> bool:
        """Whether sampling runs an unconditional branch (classifier-free guidance)."""
        raise NotImplementedError

    def encode(self, pipe, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(prompt embeddings, negative embeddings or None), all `model_max_length` rows, via the pipeline's own code."""
        negative = [self.sampling.negative_prompt] * len(prompts) if self.uses_guidance else None
        cond, uncond = pipe.encode_prompt(prompts, pipe.device, 1, self.uses_guidance, negative_prompt=negative)
        return cond, (uncond if self.uses_guidance else None)

    def timestep_cond(self, unet: torch.nn.Module, batch: int) -> torch.Tensor | None:
        """The guidance embedding an LCM UNet takes (None for SD UNets)."""
        dim = unet.config.time_cond_proj_dim
        if dim is None:
            return None
        w = torch.full((batch,), self.sampling.guidance_scale - 1.0)
        return guidance_scale_embedding(w, dim).to(device=unet.device, dtype=unet.dtype)

    def unet_forward(self, unet, noisy: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One UNet call as the sampler makes it (LCM: with `timestep_cond`)."""
        cond = self.timestep_cond(unet, noisy.shape[0])
        return unet(noisy, timesteps, encoder_hidden_states=text, timestep_cond=cond, return_dict=False)[0]

    def call_kwargs(self, pipe) -> dict[str, Any]:
        """Keyword arguments of `pipe(...)` for the configured sampling (prompt embeddings added by the caller)."""
        height, width = self.image_size(pipe)
        return {"num_inference_steps": self.sampling.num_inference_steps,
                "guidance_scale": self.sampling.guidance_scale, "height": height, "width": width}

    def sample(self, pipe, prompt_embeds: torch.Tensor, negative_embeds: torch.Tensor | None,
               generators: list[torch.Generator], output_type: str = "latent"):
        """Run the real pipeline over the timestep plan, one generator per prompt."""
        raise NotImplementedError


class SDBackend(Backend):
    name = "sd"
    pipeline_class = StableDiffusionPipeline

    @property
    def uses_guidance(self) -> bool:
        return self.sampling.guidance_scale > 1.0  # the pipeline's own rule (do_classifier_free_guidance)

    def sample(self, pipe, prompt_embeds, negative_embeds, generators, output_type="latent"):
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds, generator=generators,
                    output_type=output_type, **self.call_kwargs(pipe)).images


class LCMBackend(Backend):
    name = "lcm"
    pipeline_class = LatentConsistencyModelPipeline

    @property
    def uses_guidance(self) -> bool:
        return False  # guidance is distilled into the UNet and enters through `timestep_cond`

    def set_timesteps(self, scheduler: SchedulerMixin) -> None:
        scheduler.set_timesteps(self.sampling.num_inference_steps,
                                original_inference_steps=self.sampling.original_inference_steps)

    def check_unet(self, unet: torch.nn.Module) -> None:
        super().check_unet(unet)
        if unet.config.time_cond_proj_dim is None:
            raise NullBoothError(f"model.backend: 'lcm' needs a Latent Consistency UNet with time_cond_proj_dim, "
                                 f"but the UNet of {self.model.path!r} has none; use model.backend: sd")

    def call_kwargs(self, pipe) -> dict[str, Any]:
        kwargs = super().call_kwargs(pipe)
        kwargs["original_inference_steps"] = self.sampling.original_inference_steps
        return kwargs

    def sample(self, pipe, prompt_embeds, negative_embeds, generators, output_type="latent"):
        return pipe(prompt_embeds=prompt_embeds, generator=generators, output_type=output_type,
                    **self.call_kwargs(pipe)).images


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int) -> torch.Tensor:
    """LCM's sinusoidal embedding of the guidance scale (as in the LCM pipeline's get_guidance_scale_embedding)."""
    return LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=embedding_dim)


def get_backend(config: Config) -> Backend:
    return {"sd": SDBackend, "lcm": LCMBackend}[config.model.backend](config)


def torch_threads_for(cpus: float) -> None:
    """Match torch's intra-op threads to the CPUs Ray gave this process (Ray sets OMP_NUM_THREADS likewise)."""
    torch.set_num_threads(max(1, int(cpus)))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, int(cpus))))
