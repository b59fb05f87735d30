"""Validating a config: every field's constraints (ranges, choices, finite numbers) and the rules that span sections.
Everything that can be refused from the config alone is refused here, before Ray starts."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from pathlib import Path
from typing import Any

from nullbooth.config.sections import (
    EMBEDDED_MODEL_NAMES,
    EXTRACTORS,
    AttentionMapsConfig,
    Config,
    EvalConfig,
    ThresholdConfig,
)
from nullbooth.errors import NullBoothError
from nullbooth.layout import is_uri


def validate(config: Config) -> None:
    """Check every field's constraints, then the rules that span sections."""
    _check_constraints(config, prefix="")
    if not config.run_dir.strip():
        raise NullBoothError("run_dir: must not be empty")
    _check_writable_folder("run_dir", config.run_dir)
    if config.train.storage_path:
        _check_writable_folder("train.storage_path", config.train.storage_path)
    _check_threshold(config.projection.threshold)
    check_model_path(config.model.path)
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
    if config.train.adapter == "full" and config.train.dropout > 0:
        raise NullBoothError(f"train.dropout: {config.train.dropout} is LoRA dropout; train.adapter 'full' has no "
                             "dropout (set it to 0)")
    if config.train.with_prior_preservation and not config.train.class_prompt:
        raise NullBoothError("train.class_prompt: required when train.with_prior_preservation is true")
    _check_eval(config.eval)
    check_attention_maps(config.generate.attention, config.train.instance_prompt)
    prompts_file = config.preserve.prompts_file
    if is_uri(prompts_file):  # read by the driver with plain open(): a URI would fail after Ray started
        raise NullBoothError(f"preserve.prompts_file: {prompts_file!r} is a URI; give a local file (or 'demo')")
    if prompts_file != "demo" and not Path(prompts_file).is_file():
        raise NullBoothError(f"preserve.prompts_file: file {prompts_file!r} does not exist")
    # train.instance_data_dir is checked by the training stage: the statistics don't need the subject's images.


def has_word(prompt: str, word: str) -> bool:
    """Whether `word` stands in `prompt` as a whole word (case-insensitive), as a tokenizer would split it."""
    return re.search(rf"(?<![a-z0-9]){re.escape(word.strip().lower())}(?![a-z0-9])", prompt.lower()) is not None


def parse_attention_entry(entry: str, key: str = "generate.attention.prompts") -> tuple[str, list[str]]:
    """'PROMPT | WORD, WORD' -> (prompt, [words]); a NullBoothError naming `key` when malformed or when a word is
    not a word of the prompt."""
    prompt, sep, words_text = entry.rpartition("|")
    prompt, words = prompt.strip(), [w.strip() for w in words_text.split(",")]
    if not sep or not prompt or not all(words):
        raise NullBoothError(f"{key}: expected 'PROMPT | WORD, WORD' (the words whose attention to map), "
                             f"got {entry!r}")
    for word in words:
        if not has_word(prompt, word):
            raise NullBoothError(f"{key}: {word!r} is not a word of the prompt {prompt!r}")
    return prompt, words


def check_attention_maps(attention: AttentionMapsConfig, instance_prompt: str) -> None:
    if not attention.enabled:
        return
    if attention.prompts is None:
        if len(instance_prompt.split()) < 2:
            raise NullBoothError(f"generate.attention: the instance prompt {instance_prompt!r} needs at least two "
                                 "words (identifier and class word) to be mapped; set generate.attention.prompts "
                                 "or generate.attention.enabled: false")
        return
    if not attention.prompts:
        raise NullBoothError("generate.attention.prompts: the list is empty; leave it unset for the default prompts "
                             "or set generate.attention.enabled: false")
    for i, entry in enumerate(attention.prompts):
        parse_attention_entry(entry, f"generate.attention.prompts[{i}]")


# The threshold value's range per kind: outside it the null space is the whole input space (nothing protected) or
# the kind itself makes no sense: low ≤ value < high.
THRESHOLD_RANGES = {"relative": (0.0, 1.0), "energy": (0.0, 1.0), "percentile": (0.0, 100.0), "absolute": (0.0, math.inf)}


def _check_writable_folder(key: str, location: str) -> None:
    """A local folder the stages will write: refused now if it is a file or cannot be created, not after an hour of
    sampling. (A cloud URI is checked by the stage that opens it.)"""
    if is_uri(location):
        return
    path = Path(location).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise NullBoothError(f"{key}: {location!r} exists and is not a folder")
    existing = next(p for p in (path, *path.parents) if p.exists())
    kernel_view = existing.parts[1:2] in (("proc",), ("sys",))  # root may "write" there, but nothing can be created
    if kernel_view or not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise NullBoothError(f"{key}: {location!r} cannot be written: {str(existing)!r} is not a writable folder")


def check_model_path(path: str) -> None:
    """Refuse a `model.path` that is none of the three forms: an embedded name, an existing diffusers pipeline folder
    (with model_index.json), or a hub id "org/name". A local folder must exist where the driver runs (on a cluster:
    shared storage, or a hub id), so a typo is refused now rather than by every actor after Ray started."""
    if path in EMBEDDED_MODEL_NAMES:
        return
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "model_index.json").is_file():
            raise NullBoothError(f"model.path: {path!r} is not a diffusers pipeline folder (no model_index.json)")
        return
    looks_like_hub_id = path.count("/") == 1 and not path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise NullBoothError(f"model.path: {path!r} is neither a local folder, a hub id (org/name) nor one of "
                             f"{', '.join(repr(n) for n in EMBEDDED_MODEL_NAMES)}")


def _check_eval(ev: EvalConfig) -> None:
    if ev.extractors is not None:
        if not ev.extractors:
            raise NullBoothError("eval.extractors: the list is empty; name at least one of "
                                 f"{', '.join(EXTRACTORS)}, or leave it unset")
        for name in ev.extractors:
            if name not in EXTRACTORS:
                raise NullBoothError(f"eval.extractors: expected names among {', '.join(EXTRACTORS)}; got {name!r}")
        if len(set(ev.extractors)) != len(ev.extractors):
            raise NullBoothError(f"eval.extractors: {ev.extractors} names an extractor twice")
    if ev.k >= ev.images_per_prompt:
        raise NullBoothError(f"eval.k: the k-NN radius needs k < eval.images_per_prompt ({ev.images_per_prompt}), "
                             f"got {ev.k}")
    for key in ("clip_model", "dino_model"):
        if not getattr(ev, key).strip():
            raise NullBoothError(f"eval.{key}: must not be empty")


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
