"""The config's sections: one dataclass per section, each field with its help text and constraints in
`field(metadata=...)`, so validation, error messages and the README's reference all come from one place."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

SCHEDULERS = ("ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-a", "unipc", "lcm")
THRESHOLD_KINDS = ("relative", "absolute", "energy", "percentile")
PROJECTION_MODES = ("global", "timestep", "none")
ADAPTERS = ("lora", "full")
DEFAULT_PROTECTED_LAYERS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
EMBEDDED_MODEL_NAMES = ("tiny", "tiny-lcm", "toy", "toy-lcm")  # model.path names the package builds or ships (models/registry.py)


def _f(default: Any = None, help: str = "", *, factory: Any = None, **constraints: Any) -> Any:
    """A dataclass field with help text and constraints (choices=, min=, max=, min_exclusive=)."""
    metadata = {"help": help, **constraints}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class RayConfig:
    address: str | None = _f(None, "Ray cluster address; unset: RAY_ADDRESS, the enclosing Ray job, or a new local Ray")
    num_cpus: int | None = _f(None, "CPUs of a new local Ray (unset: all)", min=1)
    dashboard_host: str = _f("127.0.0.1", "bind address of a new local Ray's dashboard (keep it on loopback)")


@dataclass
class ModelConfig:
    backend: str = _f("sd", "model family", choices=("sd", "lcm"))
    path: str = _f("tiny", "local diffusers folder, hub id, or an embedded model: 'toy' (SD, trained on a toy world), "
                           "'toy-lcm' (LCM distilled from it) or 'tiny' / 'tiny-lcm' (random weights)")
    revision: str | None = _f(None, "hub revision (hub ids only)")
    dtype: str = _f("float32", "weights dtype for statistics and generation", choices=("float32", "float16", "bfloat16"))
    device: str = _f("auto", "where actors run the model: auto (cuda when the actor has a GPU), cpu or cuda",
                     choices=("auto", "cpu", "cuda"))


@dataclass
class SamplingConfig:
    scheduler: str = _f("ddim", "diffusers sampler used for statistics AND generation", choices=SCHEDULERS)
    num_inference_steps: int = _f(4, "sampling steps (the timestep plan)", min=1, max=1000)
    guidance_scale: float = _f(7.5, "classifier-free guidance scale (LCM: guidance embedding w)", min=0.0)
    negative_prompt: str = _f("", "negative prompt of the unconditional branch (SD with guidance > 1)")
    height: int | None = _f(None, "image height in pixels (unset: the model's native size)", min=8, max=4096)
    width: int | None = _f(None, "image width in pixels (unset: the model's native size)", min=8, max=4096)
    original_inference_steps: int | None = _f(None, "LCM: original_inference_steps (unset: the scheduler's)", min=1)
    seed: int = _f(0, "base seed; prompt i is sampled with seed + i", min=0)


@dataclass
class PreserveConfig:
    prompts_file: str = _f("demo", "preserved prompts, one per line, '#' comments; 'demo' = the packaged list "
                                   "(for model 'toy': captions of its world)")
    max_prompts: int | None = _f(None, "use only the first N prompts (unset: all)", min=1)
    holdout: int = _f(16, "the last N of the first max_prompts prompts are held out of the statistics for the "
                          "drift report", min=0)


@dataclass
class CovarianceConfig:
    num_workers: int = _f(2, "collector actors, one pipeline replica each", min=1)
    batch_size: int = _f(8, "prompts per batch dealt to an actor", min=1, max=4096)
    layers: list[str] = _f(factory=lambda: list(DEFAULT_PROTECTED_LAYERS),
                           help="protected layers: suffixes of module paths in unet.named_modules()")
    cpus_per_worker: float = _f(1.0, "CPUs per collector actor (torch threads follow)", min=0.0)
    gpus_per_worker: float = _f(0.0, "GPUs per collector actor (fractions allowed)", min=0.0)
    batches_in_flight: int = _f(2, "batches queued per actor at most", min=1)
    product_dtype: str = _f("float32", "dtype of batch products XᵀX before float64 accumulation",
                            choices=("float32", "float64"))
    accumulate_on: str = _f("device", "where the float64 sums live: device (next to the model) or host (host memory, "
                                      "for GPU actors short of memory: docs/operations.md, section 6)",
                            choices=("device", "host"))
    eigh_group_size: int = _f(8, "(layer, timestep) covariances per eigendecomposition task", min=1)
    dtype: str = _f("float32", "dtype of the stored covariance files (sums and eigendecompositions are float64)",
                    choices=("float32", "float64"))
    fail_after_batches: int | None = _f(None, "TEST AID: collector actor 0 (first incarnation only) exits its process "
                                        "right after absorbing its N-th batch, as a lost node would; the driver "
                                        "redoes every batch it had absorbed on a replacement actor", min=1)
    fail_in_reduction: int | None = _f(None, "TEST AID: collector actor 0 (first incarnation only) exits its process "
                                       "during its N-th addition of a peer's sums in the reduction, after adding "
                                       "them, as a lost node would; the driver redoes its batches on a replacement "
                                       "and that key's reduction", min=1)


@dataclass
class ThresholdConfig:
    kind: str = _f("relative", "how τ is chosen: relative (τ = value·λmax), absolute (τ = value), energy "
                   "(null space holds at most `value` of the trace), percentile (τ = value-th percentile of λ)",
                   choices=THRESHOLD_KINDS)
    value: float = _f(1e-3, "the threshold parameter of `kind`", min=0.0)


@dataclass
class ProjectionConfig:
    mode: str = _f("global", "global (one exact basis per layer), timestep (original NullBooth), none (plain LoRA)",
                   choices=PROJECTION_MODES)
    threshold: ThresholdConfig = _f(factory=ThresholdConfig, help="null-space threshold")
    allow_unprotected: bool = _f(False, "allow LoRA targets without a basis (listed as unprotected)")


@dataclass
class TrainConfig:
    instance_data_dir: str = _f("demo", "folder of subject images; 'demo' = the packaged synthetic subject")
    instance_prompt: str = _f("a photo of sks teapot", "prompt with the rare identifier")
    class_prompt: str | None = _f(None, "class prompt for prior preservation")
    with_prior_preservation: bool = _f(False, "add the prior-preservation loss on class images")
    prior_loss_weight: float = _f(1.0, "weight of the prior-preservation loss", min=0.0)
    num_class_images: int = _f(8, "class images wanted; missing ones are generated with the base model", min=1)
    resolution: int | None = _f(None, "training resolution in pixels (unset: the model's native size)", min=8)
    num_workers: int = _f(1, "Ray Train workers (DDP)", min=1)
    use_gpu: bool = _f(False, "one GPU per training worker")
    cpus_per_worker: float = _f(1.0, "CPUs per training worker", min=0.0)
    max_failures: int = _f(0, "worker failures Ray Train recovers from (resuming from the last checkpoint)", min=-1)
    storage_path: str | None = _f(None, "Ray Train storage (local path or s3://, gs://; unset: run_dir/train)")
    name: str = _f("nullbooth-lora", "Ray Train run name (re-run with the same name to resume)")
    plain_baseline: bool = _f(False, "also train a plain LoRA (projection.mode none) on the same data, into "
                                     "run_dir/lora-none, shown beside the projected one in the report")
    adapter: str = _f("lora", "what is trained on the targets: 'lora' (a PEFT LoRA) or 'full' (the linears' weights "
                              "themselves, updates projected as the LoRA's; wants a ~10-100x smaller learning_rate)",
                      choices=ADAPTERS)
    rank: int = _f(4, "LoRA rank", min=1)
    alpha: float = _f(4.0, "LoRA alpha", min=0.0, min_exclusive=True)
    dropout: float = _f(0.0, "LoRA dropout", min=0.0, max=1.0)
    target_modules: list[str] | None = _f(None, "LoRA target module suffixes (unset: covariance.layers)")
    learning_rate: float = _f(1e-3, "AdamW learning rate", min=0.0, min_exclusive=True)
    lr_scheduler: str = _f("constant", "diffusers get_scheduler name",
                           choices=("constant", "constant_with_warmup", "linear", "cosine",
                                    "cosine_with_restarts", "polynomial"))
    lr_warmup_steps: int = _f(0, "learning-rate warm-up steps", min=0)
    max_train_steps: int = _f(60, "optimizer steps", min=1)
    train_batch_size: int = _f(2, "samples per worker per micro-batch", min=1, max=4096)
    gradient_accumulation_steps: int = _f(1, "micro-batches per optimizer step", min=1)
    max_grad_norm: float = _f(1.0, "gradient clipping norm (0 disables)", min=0.0)
    mixed_precision: str = _f("no", "autocast dtype on GPU", choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = _f(False, "trade compute for memory in the UNet")
    seed: int = _f(0, "training seed", min=0)
    checkpoint_every: int = _f(20, "steps between checkpoints", min=1)
    checkpoints_to_keep: int = _f(2, "checkpoints Ray Train keeps", min=1)
    metrics_every: int = _f(10, "steps between preservation-error metrics", min=1)
    validation_prompts: list[str] = _f(factory=list, help="prompts sampled every validation_every steps")
    validation_every: int = _f(50, "steps between validation grids", min=1)
    fail_at_step: int | None = _f(None, "TEST AID: worker 0 raises once at this step (first attempt only)", min=1)


@dataclass
class AttentionMapsConfig:
    enabled: bool = _f(True, "record subject-token cross-attention maps while generating and draw them in the report")
    prompts: list[str] | None = _f(None, "entries 'PROMPT | WORD, WORD': whose attention to map in which prompt (unset: "
                                         "the instance prompt's identifier and class word, its last two words, and "
                                         "the object word of the first `holdout_prompts` held-out prompts)")
    holdout_prompts: int = _f(2, "held-out prompts mapped when `prompts` is unset", min=0, max=16)


@dataclass
class GenerateConfig:
    prompts: list[str] | None = _f(None, "prompts to sample (unset: instance-prompt variants + held-out prompts)")
    num_images_per_prompt: int = _f(1, "images per prompt (at most the seed stride, 1000)", min=1, max=1000)
    subject_images: int | None = _f(None, "images per instance-prompt variant and class prompt, where subject "
                                          "fidelity and language drift are counted (unset: num_images_per_prompt)",
                                    min=1, max=1000)
    seed: int = _f(1234, "seed of image i of prompt j: seed + 1000·j + i", min=0)
    num_workers: int = _f(1, "generation actors (Ray Data actor pool)", min=1)
    batch_size: int = _f(4, "prompts per generation batch", min=1, max=4096)
    lora_scale: float = _f(1.0, "LoRA scale at generation (train.adapter full: the update's, W₀ + scale·ΔW)", min=0.0)
    baseline_run: str | None = _f(None, "another run_dir (e.g. projection.mode=none) to compare in the report")
    attention: AttentionMapsConfig = _f(factory=AttentionMapsConfig, help="subject-token attention maps")


EXTRACTORS = ("probe", "clip", "dino")


@dataclass
class EvalConfig:
    prompts: int = _f(8, "held-out preserved prompts evaluated (the first N of the statistics' held-out list)", min=1)
    images_per_prompt: int = _f(16, "images per prompt and model; base is sampled twice as many (two seed halves: "
                                     "the second half is the no-change reference)", min=2, max=500)
    subject_images: int = _f(4, "images per instance-prompt variant for subject fidelity", min=1, max=1000)
    extractors: list[str] | None = _f(None, "feature extractors among probe, clip, dino (unset: probe for a model "
                                            "that ships one, e.g. 'toy'; else clip and dino)")
    clip_model: str = _f("openai/clip-vit-large-patch14", "CLIP model (hub id or local folder): CLIP-I, CLIP-T and "
                                                          "the clip drift metrics")
    dino_model: str = _f("facebook/dinov2-base", "DINO model (hub id or local folder, DINOv2 or DINO ViT, e.g. "
                                                 "facebook/dino-vits16 as in the DreamBooth paper): CLS features")
    k: int = _f(5, "nearest neighbours of precision, recall, density and coverage", min=1)
    kernel: str = _f("cubic", "MMD kernel: cubic = (a·b/d + 1)^3 as in KID, linear = a·b", choices=("cubic", "linear"))
    seed: int = _f(5678, "seed of image i of prompt j: seed + 1000·j + i", min=0)
    num_workers: int = _f(1, "sampling actors (Ray Data actor pool)", min=1)
    batch_size: int = _f(16, "prompts per sampling batch", min=1, max=4096)


@dataclass
class Config:
    run_dir: str = _f("runs/tiny", "output folder of the run (local path or s3://, gs://, file:// URI)")
    model: ModelConfig = _f(factory=ModelConfig, help="model")
    sampling: SamplingConfig = _f(factory=SamplingConfig, help="sampling, shared by statistics and generation")
    preserve: PreserveConfig = _f(factory=PreserveConfig, help="preserved prompts")
    covariance: CovarianceConfig = _f(factory=CovarianceConfig, help="statistics stage")
    projection: ProjectionConfig = _f(factory=ProjectionConfig, help="null-space projection")
    train: TrainConfig = _f(factory=TrainConfig, help="training stage")
    generate: GenerateConfig = _f(factory=GenerateConfig, help="generation and report stage")
    eval: EvalConfig = _f(factory=EvalConfig, help="feature-space evaluation (nullbooth eval)")
    ray: RayConfig = _f(factory=RayConfig, help="Ray connection")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


