"""Training state on disk: everything an exact resume needs, as safetensors and JSON (nothing is pickled).

A checkpoint folder holds

    state.json                  step, samples seen, the training signature, LR scheduler state, optimizer
                                hyper-parameters (param_groups) and the non-tensor parts of its per-parameter state,
                                python/numpy RNG states of every rank
    trainable.safetensors       the LoRA parameters as trained (global mode: the raw A before A·U·Uᵀ); with
                                train.adapter full, each target's raw update ΔW (see full.py)
    optimizer.safetensors       the optimizer's per-parameter tensors ("<index>.<key>", e.g. "3.exp_avg")
    rng.safetensors             torch CPU (and CUDA) generator states, one per rank ("torch.<rank>")
    lora/                       the diffusers-format LoRA of this step (what the run exports), see export.py;
                                train.adapter full: lora/unet/, the merged UNet (full.save_unet)
    report.json                 preservation errors and losses at this step

state.json also holds the fp16 GradScaler's state (scale and growth tracker: without them an fp16 resume scales
its first losses differently), and is written LAST: it records the sha256 of every other file of the folder and a
digest of its own content. Loading checks all of them, so a truncated, replaced (e.g. a pickle in place of a
safetensors file) or edited checkpoint is refused by name with one line, never unpickled nor half-loaded.

The training signature (run.training_signature: model, statistics, data, every hyper-parameter that changes the
result) is compared on resume: a checkpoint from another configuration is refused with a message naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from nullbooth.errors import NullBoothError
from nullbooth.layout import CHECKPOINT_OPTIMIZER as OPTIMIZER
from nullbooth.layout import CHECKPOINT_RNG as RNG
from nullbooth.layout import CHECKPOINT_STATE as STATE
from nullbooth.layout import CHECKPOINT_TRAINABLE as TRAINABLE
from nullbooth.layout import REPORT_NAME as REPORT


@dataclass
class TrainingState:
    step: int
    samples_seen: int
    signature: dict[str, Any]
    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]  # a torch optimizer state_dict
    lr_scheduler: dict[str, Any]
    rng: list[dict[str, Any]]  # per rank: {"torch": uint8 tensor, "cuda": tensor|None, "numpy": [...], "python": [...]}
    report: dict[str, Any] | None
    scaler: dict[str, Any] | None = None  # torch.amp.GradScaler.state_dict() (fp16 training), else None


# ---------------------------------------------------------------------------------------------------------------
# RNG states


def rng_state() -> dict[str, Any]:
    """This process's global RNG states (torch, CUDA, numpy, python)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ---------------------------------------------------------------------------------------------------------------
# save / load


def save_training_state(directory: str | Path, *, step: int, samples_seen: int, signature: dict[str, Any],
                        trainable: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, lr_scheduler: Any,
                        rng: list[dict[str, Any]], scaler: torch.amp.GradScaler | None = None) -> None:
    """Write the state files into `directory` (a fresh local folder Ray Train then persists), state.json last with
    the digests of every file already in the folder (write the LoRA and report.json first)."""
    directory = Path(directory)
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(directory / TRAINABLE))
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{index}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{index}.{key}"] = value
    save_file(tensors, str(directory / OPTIMIZER))
    rng_tensors = {f"torch.{rank}": r["torch"] for rank, r in enumerate(rng)}
    rng_tensors.update({f"cuda.{rank}": r["cuda"] for rank, r in enumerate(rng) if r.get("cuda") is not None})
    save_file(rng_tensors, str(directory / RNG))
    state = {"step": step, "samples_seen": samples_seen, "signature": signature,
             "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
             "lr_scheduler": _jsonable(lr_scheduler.state_dict(), "lr_scheduler"),
             "rng": [{"numpy": r["numpy"], "python": r["python"]} for r in rng],
             "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
             "files": _file_digests(directory)}
    state = _jsonable(state, "state")
    state["digest"] = _content_digest(state)
    temp = directory / f".{STATE}.tmp"
    temp.write_text(json.dumps(state, indent=1))
    os.replace(temp, directory / STATE)


def load_training_state(directory: str | Path) -> TrainingState:
    """The checkpoint in `directory`, every file checked against state.json (a NullBoothError naming the file)."""
    directory = Path(directory)
    state = read_state(directory)
    opt_tensors = _load_tensors(directory, OPTIMIZER)
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(opt_tensors.items()) + list(state["optimizer"]["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    rng_tensors = _load_tensors(directory, RNG)
    try:
        rng = [{"torch": rng_tensors[f"torch.{rank}"], "cuda": rng_tensors.get(f"cuda.{rank}"), **entry}
               for rank, entry in enumerate(state["rng"])]
    except KeyError as err:
        raise _invalid(directory, f"{RNG} lacks tensor {err}") from None
    report = json.loads((directory / REPORT).read_text()) if REPORT in state["files"] else None
    return TrainingState(
        step=state["step"], samples_seen=state["samples_seen"], signature=state["signature"],
        trainable=_load_tensors(directory, TRAINABLE),
        optimizer={"state": per_param, "param_groups": state["optimizer"]["param_groups"]},
        lr_scheduler=state["lr_scheduler"], rng=rng, report=report, scaler=state["scaler"])


def read_state(directory: str | Path, required: tuple[str, ...] = (TRAINABLE, OPTIMIZER, RNG)) -> dict[str, Any]:
    """state.json of a checkpoint, validated, after checking every file it lists (and `required`) against its
    sha256: a NullBoothError naming the checkpoint and the file otherwise."""
    directory = Path(directory)
    if not (directory / STATE).is_file():
        raise _invalid(directory, f"{STATE} is missing; it was not written by NullBooth's training")
    try:
        state = json.loads((directory / STATE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise _invalid(directory, f"{STATE} is not valid JSON ({err})") from None
    problem = _state_problem(state)
    if problem is None and state["digest"] != _content_digest({k: v for k, v in state.items() if k != "digest"}):
        problem = "its content does not match its digest (the file was edited)"
    if problem is not None:
        raise _invalid(directory, f"{STATE}: {problem}")
    for name in required:
        if name not in state["files"]:
            raise _invalid(directory, f"{STATE} does not list {name}")
    for name, digest in state["files"].items():
        path = directory / name
        if not path.is_file():
            raise _invalid(directory, f"{name} is missing")
        if _sha256(path) != digest:
            raise _invalid(directory, f"{name} does not match the sha256 recorded in {STATE} (changed or replaced)")
    return state


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_param_key(key: str) -> bool:
    index, _, name = key.partition(".")
    return index.isdigit() and bool(name)


def _is_inner_path(v: Any) -> bool:
    return isinstance(v, str) and bool(v) and not v.startswith("/") and ".." not in v.split("/")


def _is_sha256(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


_STATE_FIELDS = {
    "step": (lambda v: _is_count(v), "a non-negative integer"),
    "samples_seen": (lambda v: _is_count(v), "a non-negative integer"),
    "signature": (lambda v: isinstance(v, dict), "an object"),
    "optimizer": (lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list)
                  and isinstance(v.get("scalars"), dict) and all(_is_param_key(k) for k in v["scalars"]),
                  "an object with 'param_groups' and 'scalars'"),
    "lr_scheduler": (lambda v: isinstance(v, dict), "an object"),
    "rng": (lambda v: isinstance(v, list) and bool(v) and all(
        isinstance(r, dict) and isinstance(r.get("numpy"), list) and len(r["numpy"]) == 5
        and isinstance(r.get("python"), list) and len(r["python"]) == 3 for r in v),
        "a non-empty list of per-rank numpy/python RNG states"),
    "scaler": (lambda v: v is None or isinstance(v, dict), "null or an object"),
    "files": (lambda v: isinstance(v, dict) and all(_is_inner_path(k) and _is_sha256(d) for k, d in v.items()),
              "an object file (inside the checkpoint) -> sha256"),
    "digest": (_is_sha256, "a sha256"),
}


def _state_problem(state: Any) -> str | None:
    if not isinstance(state, dict):
        return f"expected a JSON object, got {type(state).__name__}"
    for name, (check, expected) in _STATE_FIELDS.items():
        if name not in state:
            return f"field {name!r} is missing (written by an older NullBooth?)"
        if not check(state[name]):
            return f"field {name!r} must be {expected}"
    return None


def _invalid(directory: Path, problem: str) -> NullBoothError:
    return NullBoothError(f"checkpoint {directory}: {problem}")


def _load_tensors(directory: Path, name: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(directory / name))
    except (SafetensorError, ValueError, OSError) as err:
        raise _invalid(directory, f"{name} is not a valid safetensors file ({err})") from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _file_digests(directory: Path) -> dict[str, str]:
    """sha256 of every file under `directory` (but state.json), keyed by its '/'-separated relative path."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (STATE, f".{STATE}.tmp"))
    return {p.relative_to(directory).as_posix(): _sha256(p) for p in files}


def _content_digest(state: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def signature_mismatches(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Keys whose value differs between a checkpoint's training signature and the current one."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: checkpoint has {saved.get(k)!r}, config has {current.get(k)!r}" for k in keys
            if saved.get(k) != current.get(k)]


def _jsonable(obj: Any, where: str) -> Any:
    """`obj` with tuples as lists and tensors as numbers, or a TypeError naming what cannot be stored as JSON."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v, f"{where}.{k}") for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if torch.is_tensor(obj) and obj.numel() == 1:
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a JSON checkpoint")
