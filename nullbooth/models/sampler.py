"""Batch image sampling as Ray Data batch inference: one pipeline per actor, any number of actors.

Used by the generation stage (base and fine-tuned samples) and by the training stage (class images for prior
preservation). Every prompt carries its own seed and its own `torch.Generator`, so an image depends only on
(model, LoRA, prompt, seed, sampling config), never on which actor sampled it or which prompts shared its batch.
Ray Data does not keep row order across an actor pool, so rows carry their input index and are sorted back.

Ray must already be connected (`nullbooth.cluster.connect`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from typing import Any

import numpy as np
import torch

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import LORA_WEIGHTS, UNET_CONFIG, UNET_DIR, UNET_WEIGHTS
from nullbooth.models.backends import get_backend, torch_threads_for
from nullbooth.storage import RunDir

ADAPTER_NAME = "nullbooth"


# ---------------------------------------------------------------------------------------------------------------
# One process: load, sample, decode


def load_sampling_pipeline(config: Config, device: torch.device | str = "cpu", lora_dir: str | None = None,
                           lora_scale: float = 1.0):
    """The configured pipeline, with the fine-tuned model of `lora_dir` (a diffusers-format LoRA, or with
    train.adapter full a merged UNet in its unet/) applied at `lora_scale` when given."""
    pipe = get_backend(config).load_pipeline(device)
    if lora_dir is not None:
        FinetunedModels(pipe).add(ADAPTER_NAME, lora_dir, lora_scale, select=True)
    return pipe


def is_full_unet(lora_dir: str) -> bool:
    """Whether a trained folder holds a merged UNet (train.adapter full) rather than a LoRA."""
    return RunDir(lora_dir).exists(f"{UNET_DIR}/{UNET_WEIGHTS}")


def load_full_unet(lora_dir: str, base: torch.nn.Module, scale: float = 1.0) -> torch.nn.Module:
    """The merged UNet of a full fine-tune (stock `UNet2DConditionModel.from_pretrained`), in the base UNet's dtype
    and device; `scale` ≠ 1 moves every weight to W₀ + scale·(W − W₀), as a LoRA scale scales its update."""
    from diffusers import UNet2DConditionModel

    with _local_copy(RunDir(lora_dir), [f"{UNET_DIR}/{UNET_CONFIG}", f"{UNET_DIR}/{UNET_WEIGHTS}"]) as local:
        unet = UNet2DConditionModel.from_pretrained(local, subfolder=UNET_DIR, torch_dtype=base.dtype)
    unet = unet.to(base.device).eval()
    if scale != 1.0:
        with torch.no_grad():
            reference = base.state_dict()
            for name, param in unet.state_dict().items():
                param.copy_(reference[name] + scale * (param - reference[name]))
    return unet


class FinetunedModels:
    """A pipeline's base UNet and the fine-tuned models sampled beside it, by name: LoRAs (PEFT adapters on the
    base UNet, loaded by stock `load_lora_weights`) and full fine-tunes (their own UNets, swapped in)."""

    def __init__(self, pipe):
        self.pipe, self.base = pipe, pipe.unet
        self.unets: dict[str, torch.nn.Module] = {}
        self.loras: dict[str, float] = {}

    def add(self, name: str, lora_dir: str, scale: float = 1.0, select: bool = False) -> None:
        if is_full_unet(lora_dir):
            self.unets[name] = load_full_unet(lora_dir, self.base, scale)
        else:
            apply_lora(self.pipe, lora_dir, scale, adapter_name=name)
            self.loras[name] = scale
        if select:
            self.use(name)

    def use(self, name: str | None) -> None:
        """Sample with the model `name` from now on; None: the base model (LoRAs switched off, not unloaded)."""
        if name in self.unets:
            self.pipe.unet = self.unets[name]
            return
        self.pipe.unet = self.base
        if name is None:
            if self.loras:
                self.pipe.disable_lora()
            return
        self.pipe.enable_lora()
        use_adapter(self.pipe, name, self.loras[name])


def apply_lora(pipe, lora_dir: str, lora_scale: float = 1.0, adapter_name: str = ADAPTER_NAME) -> None:
    """Load a LoRA with stock `load_lora_weights` (not fused: a zero LoRA leaves every output bit-identical) and make
    it the active adapter; a pipeline may hold several, each under its own name (see `use_adapter`)."""
    run = RunDir(lora_dir)
    if not run.exists(LORA_WEIGHTS):
        raise NullBoothError(f"{run.uri(LORA_WEIGHTS)} does not exist: no LoRA to load")
    with _local_copy(run) as local, warnings.catch_warnings():
        # PEFT warns that a second adapter joins the first: holding several, each under its name, is the point here.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        pipe.load_lora_weights(local, weight_name=LORA_WEIGHTS, adapter_name=adapter_name)
    use_adapter(pipe, adapter_name, lora_scale)


def use_adapter(pipe, adapter_name: str, lora_scale: float = 1.0) -> None:
    """Sample with exactly this one of the pipeline's LoRAs, at `lora_scale`."""
    pipe.set_adapters([adapter_name], adapter_weights=[float(lora_scale)])


class _local_copy:
    """A local folder holding the trained files (`files`, default the LoRA file): the folder itself when local, a
    temporary copy for a cloud URI.

    Loading from a file (not from a state dict) keeps the adapter metadata (rank, alpha) diffusers saves with it.
    """

    def __init__(self, run: RunDir, files: list[str] | None = None):
        self.run = run
        self.files = files or [LORA_WEIGHTS]
        self.temp: str | None = None

    def __enter__(self) -> str:
        if self.run.is_local:
            return self.run.local_path()
        self.temp = tempfile.mkdtemp(prefix="nullbooth-lora-")
        for rel in self.files:
            os.makedirs(os.path.dirname(os.path.join(self.temp, rel)), exist_ok=True)
            with open(os.path.join(self.temp, rel), "wb") as f:
                f.write(self.run.read_bytes(rel))
        return self.temp

    def __exit__(self, *exc: Any) -> None:
        if self.temp is not None:
            shutil.rmtree(self.temp, ignore_errors=True)


@torch.no_grad()
def sample_batch(config: Config, pipe, prompts: list[str], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (B, H, W, 3), final latents float32 (B, C, h, w)) for `prompts`, one generator per seed."""
    backend = get_backend(config)
    cond, uncond = backend.encode(pipe, list(prompts))
    generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]
    latents = backend.sample(pipe, cond, uncond, generators, output_type="latent")
    return decode_latents(pipe, latents), latents.float().cpu().numpy()


@torch.no_grad()
def decode_latents(pipe, latents: torch.Tensor) -> np.ndarray:
    """Latents -> uint8 images, exactly as the pipeline's own `output_type="pil"` path decodes them."""
    vae = pipe.vae
    decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
    images = pipe.image_processor.postprocess(decoded, output_type="np", do_denormalize=[True] * len(decoded))
    return (images * 255).round().astype(np.uint8)  # what diffusers' numpy_to_pil does


# ---------------------------------------------------------------------------------------------------------------
# Ray Data: an actor pool of pipelines


class _SamplerActor:
    """A Ray Data callable class: holds one pipeline, samples each batch of (index, prompt, seed) rows."""

    def __init__(self, config: Config, lora_dir: str | None, lora_scale: float, num_cpus: float, has_gpu: bool,
                 with_base: bool, extra_loras: dict[str, str]):
        torch_threads_for(num_cpus)
        self.config = config
        self.with_base = with_base
        self.lora_scale = lora_scale
        self.extra = list(extra_loras)
        device = get_backend(config).device(has_gpu=has_gpu)
        self.pipe = get_backend(config).load_pipeline(device)
        self.models = FinetunedModels(self.pipe)
        for name, extra_dir in extra_loras.items():
            self.models.add(name, extra_dir, lora_scale)
        self.main = ADAPTER_NAME if lora_dir is not None else None  # None: the base model (e.g. class images)
        if lora_dir is not None:
            self.models.add(ADAPTER_NAME, lora_dir, lora_scale, select=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch["prompt"]]
        seeds = [int(s) for s in batch["seed"]]
        out = {"index": batch["index"]}
        if self.with_base:
            # The same prompts in the same batch with the adapter switched off (not unloaded): the base model runs
            # the unmodified linears on an identical batch, so a zero LoRA gives bit-identical samples.
            self.models.use(None)
            out["base_image"], out["base_latent"] = sample_batch(self.config, self.pipe, prompts, seeds)
        for name in self.extra:  # the same batch again under each other model (e.g. the plain baseline)
            self.models.use(name)
            out[f"{name}_image"], out[f"{name}_latent"] = sample_batch(self.config, self.pipe, prompts, seeds)
        self.models.use(self.main)
        out["image"], out["latent"] = sample_batch(self.config, self.pipe, prompts, seeds)
        return out


def sample_images(config: Config, prompts: list[str], seeds: list[int], lora_dir: str | None = None,
                  lora_scale: float = 1.0, num_workers: int = 1, batch_size: int = 4,
                  num_cpus: float = 1.0, num_gpus: float | None = None, with_base: bool = False,
                  extra_loras: dict[str, str] | None = None) -> list[dict]:
    """Sample `prompts` (prompt i with `seeds[i]`) on a Ray Data actor pool of `num_workers` pipelines.

    `with_base` (needs `lora_dir`) adds "base_image" and "base_latent": the same batch sampled by the same actor
    with the LoRA switched off, so base and fine-tuned samples come from one pipeline per actor.

    `extra_loras` {name: LoRA folder} (needs `lora_dir`) adds "<name>_image" and "<name>_latent": the same batch
    sampled with each of those LoRAs instead of `lora_dir`'s.

    Returns, in input order, {"prompt", "seed", "image": uint8 (H, W, 3), "latent": float32 (C, h, w), the final
    latents before the VAE decode}. `num_gpus` per actor defaults to 1 when the cluster has GPUs and
    `model.device` allows them, else 0.
    """
    import ray
    import ray.data

    from nullbooth.cluster import cluster_has_gpu

    if len(prompts) != len(seeds):
        raise ValueError(f"sample_images: {len(prompts)} prompts but {len(seeds)} seeds")
    if not prompts:
        return []
    if not ray.is_initialized():
        raise RuntimeError("sample_images needs a connected Ray (nullbooth.cluster.connect)")
    extra_loras = dict(extra_loras or {})
    if (with_base or extra_loras) and lora_dir is None:
        raise ValueError("sample_images: with_base and extra_loras need lora_dir")
    if num_gpus is None:
        num_gpus = 1.0 if config.model.device != "cpu" and cluster_has_gpu() else 0.0
    rows = [{"index": i, "prompt": p, "seed": int(s)} for i, (p, s) in enumerate(zip(prompts, seeds))]
    dataset = ray.data.from_items(rows).map_batches(
        _SamplerActor,
        fn_constructor_kwargs={"config": config, "lora_dir": lora_dir, "lora_scale": lora_scale,
                               "num_cpus": num_cpus, "has_gpu": num_gpus > 0, "with_base": with_base,
                               "extra_loras": extra_loras},
        batch_size=batch_size, batch_format="numpy",
        # A fixed pool of actors: Ray 2.51+ deprecates `concurrency=` for this in favour of `compute=`.
        compute=ray.data.ActorPoolStrategy(size=min(num_workers, len(rows))),
        num_cpus=num_cpus, num_gpus=num_gpus)
    results = sorted(dataset.take_all(), key=lambda row: int(row["index"]))
    if [int(r["index"]) for r in results] != list(range(len(rows))):
        raise RuntimeError("sample_images: Ray Data returned an incomplete result")  # an invariant, not a user error
    variants = [""] + (["base_"] if with_base else []) + [f"{name}_" for name in extra_loras]
    keys = [f"{v}{kind}" for v in variants for kind in ("image", "latent")]
    return [{"prompt": prompts[i], "seed": int(seeds[i]),
             **{k: np.asarray(r[k], dtype=np.uint8 if k.endswith("image") else np.float32) for k in keys}}
            for i, r in enumerate(results)]
