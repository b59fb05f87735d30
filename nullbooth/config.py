"""Typed configuration: one dataclass per section, loaded from YAML with `--set a.b=value` overrides.

Every field carries its help text and its constraints in `field(metadata=...)`, so validation, error messages
and the README's configuration reference all come from one place. Validation is strict: an unknown key gets a
did-you-mean suggestion, a wrong type names the expected type, an out-of-range value names the allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nullbooth.errors import NullBoothError
from nullbooth.layout import is_uri

SCHEDULERS = ("ddim", "dpm++2m", "dpm++2m-karras", "euler", "euler-a", "unipc", "lcm")
THRESHOLD_KINDS = ("relative", "absolute", "energy", "percentile")
PROJECTION_MODES = ("global", "timestep", "none")
DEFAULT_PROTECTED_LAYERS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


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
    path: str = _f("tiny", "local diffusers folder, hub id, or an embedded model: 'toy' (trained on a toy world) or "
                           "'tiny' / 'tiny-lcm' (random weights)")
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
    holdout: int = _f(16, "last N prompts of the file are held out of the statistics for the drift report", min=0)


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
    eigh_group_size: int = _f(8, "(layer, timestep) covariances per eigendecomposition task", min=1)
    dtype: str = _f("float32", "dtype of the stored covariance files (sums and eigendecompositions are float64)",
                    choices=("float32", "float64"))
    fail_after_batches: int | None = _f(None, "TEST AID: collector actor 0 (first incarnation only) exits its process "
                                        "right after absorbing its N-th batch, as a lost node would; the driver "
                                        "redoes every batch it had absorbed on a replacement actor", min=1)


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
class GenerateConfig:
    prompts: list[str] | None = _f(None, "prompts to sample (unset: instance-prompt variants + held-out prompts)")
    num_images_per_prompt: int = _f(1, "images per prompt", min=1)
    seed: int = _f(1234, "seed of image i of prompt j: seed + 1000·j + i", min=0)
    num_workers: int = _f(1, "generation actors (Ray Data actor pool)", min=1)
    batch_size: int = _f(4, "prompts per generation batch", min=1, max=4096)
    lora_scale: float = _f(1.0, "LoRA scale at generation", min=0.0)
    baseline_run: str | None = _f(None, "another run_dir (e.g. projection.mode=none) to compare in the report")


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
    ray: RayConfig = _f(factory=RayConfig, help="Ray connection")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise NullBoothError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise NullBoothError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise NullBoothError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(raw, dict):
            raise NullBoothError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message runs over several lines with the source quoted)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`1e-3`, `true`, `[a, b]`)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise NullBoothError(f"--set {override!r}: expected KEY=VALUE, e.g. --set sampling.num_inference_steps=8")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise NullBoothError(f"--set {override!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise NullBoothError(f"--set {override!r}: {'.'.join(parts[:depth + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, type-checking every value."""
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise NullBoothError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise NullBoothError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise NullBoothError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise NullBoothError(f"{key}: expected {_type_name(hint)}, got {_describe(value)}")


def _type_name(hint: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"


# --------------------------------------------------------------------------------------------------------------
# Validation


def validate(config: Config) -> None:
    """Check every field's constraints, then the rules that span sections."""
    _check_constraints(config, prefix="")
    if not config.run_dir.strip():
        raise NullBoothError("run_dir: must not be empty")
    _check_threshold(config.projection.threshold)
    model, sampling = config.model, config.sampling
    if model.backend == "lcm" and sampling.scheduler != "lcm":
        raise NullBoothError(f"sampling.scheduler: model.backend 'lcm' samples with 'lcm', got {sampling.scheduler!r}")
    if model.backend == "sd" and sampling.scheduler == "lcm":
        raise NullBoothError("sampling.scheduler: 'lcm' needs model.backend: lcm (a Latent Consistency Model)")
    for name in ("height", "width"):
        size = getattr(sampling, name)
        if size is not None and size % 8:
            raise NullBoothError(f"sampling.{name}: must be a multiple of 8, got {size}")
    if not config.covariance.layers:
        raise NullBoothError("covariance.layers: at least one protected layer pattern is needed")
    if config.train.plain_baseline and config.generate.baseline_run:
        raise NullBoothError("generate.baseline_run: train.plain_baseline already gives the report a baseline; "
                             "unset one of them")
    if config.train.plain_baseline and config.projection.mode == "none":
        raise NullBoothError("train.plain_baseline: the run itself trains a plain LoRA (projection.mode: none); "
                             "the baseline is for global or timestep mode")
    if config.train.with_prior_preservation and not config.train.class_prompt:
        raise NullBoothError("train.class_prompt: required when train.with_prior_preservation is true")
    if config.preserve.prompts_file != "demo" and not is_uri(config.preserve.prompts_file):
        if not Path(config.preserve.prompts_file).is_file():
            raise NullBoothError(f"preserve.prompts_file: file {config.preserve.prompts_file!r} does not exist")
    # train.instance_data_dir is checked by the training stage: the statistics don't need the subject's images.


# The threshold value's range per kind: outside it the null space is the whole input space (nothing protected) or
# the kind itself makes no sense: low ≤ value < high.
THRESHOLD_RANGES = {"relative": (0.0, 1.0), "energy": (0.0, 1.0), "percentile": (0.0, 100.0), "absolute": (0.0, math.inf)}


def _check_threshold(threshold: ThresholdConfig) -> None:
    low, high = THRESHOLD_RANGES[threshold.kind]
    if not low <= threshold.value < high:
        upper = "" if math.isinf(high) else f" and < {high:g}"
        raise NullBoothError(f"projection.threshold.value: for kind {threshold.kind!r} expected a value ≥ {low:g}"
                             f"{upper}, got {threshold.value!r}")


def _check_constraints(obj: Any, prefix: str) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            _check_constraints(value, f"{key}.")
            continue
        meta = f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            close = difflib.get_close_matches(str(value), [str(c) for c in meta["choices"]], n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise NullBoothError(f"{key}: expected one of {', '.join(map(str, meta['choices']))}; "
                                 f"got {value!r}{hint}")
        if isinstance(value, float) and not math.isfinite(value):
            raise NullBoothError(f"{key}: expected a finite number, got {value!r}")
        if "min" in meta and isinstance(value, (int, float)):
            low = meta["min"]
            if value < low or (meta.get("min_exclusive") and value == low):
                rel = ">" if meta.get("min_exclusive") else "≥"
                raise NullBoothError(f"{key}: expected a value {rel} {low}, got {value!r}")
        if "max" in meta and isinstance(value, (int, float)) and value > meta["max"]:
            raise NullBoothError(f"{key}: expected a value ≤ {meta['max']}, got {value!r}")


def with_absolute_paths(config: Config) -> Config:
    """The config with its local paths made absolute against this process's working directory.

    Stages hand the config to Ray actors, tasks and Train workers, whose working directory is not the driver's: a
    relative `run_dir` would point somewhere else there. URIs and the "demo" / "tiny" names stay as they are.
    """
    def local(value: str | None, keep: tuple[str, ...] = ()) -> str | None:
        if value is None or value in keep or is_uri(value):
            return value
        return str(Path(value).expanduser().absolute())

    return dataclasses.replace(
        config,
        run_dir=local(config.run_dir),
        preserve=dataclasses.replace(config.preserve, prompts_file=local(config.preserve.prompts_file, ("demo",))),
        train=dataclasses.replace(config.train, storage_path=local(config.train.storage_path),
                                  instance_data_dir=local(config.train.instance_data_dir, ("demo",))),
        generate=dataclasses.replace(config.generate, baseline_run=local(config.generate.baseline_run)),
    )


def config_to_yaml(config: Config) -> str:
    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def reference_table() -> str:
    """The configuration reference as a Markdown table (key, default, meaning), generated from the dataclasses."""
    rows = ["| key | default | meaning |", "|---|---|---|"]

    def walk(cls: type, prefix: str) -> None:
        instance = cls()
        for f in dataclasses.fields(cls):
            default = getattr(instance, f.name)
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")
                continue
            meta = f.metadata
            help_text = meta.get("help", "")
            if "choices" in meta:
                help_text += f" ({' / '.join(map(str, meta['choices']))})"
            rows.append(f"| `{prefix}{f.name}` | `{yaml.safe_dump(default, default_flow_style=True).strip().removesuffix('...').strip()}` | {help_text} |")

    walk(Config, "")
    return "\n".join(rows)
