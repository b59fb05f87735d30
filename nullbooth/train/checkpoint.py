"""Training state on disk: everything an exact resume needs, as safetensors and JSON (nothing is pickled).

A checkpoint folder holds

    state.json                  step, samples seen, the training signature, LR scheduler state, optimizer
                                hyper-parameters (param_groups) and the non-tensor parts of its per-parameter state,
                                python/numpy RNG states of every rank
    trainable.safetensors       the LoRA parameters as trained (global mode: the raw A before A·U·Uᵀ)
    optimizer.safetensors       the optimizer's per-parameter tensors ("<index>.<key>", e.g. "3.exp_avg")
    rng.safetensors             torch CPU (and CUDA) generator states, one per rank ("torch.<rank>")
    lora/                       the diffusers-format LoRA of this step (what the run exports), see export.py
    report.json                 preservation errors and losses at this step

The training signature (model, mode, rank, alpha, targets, ...) is compared on resume: a checkpoint from another
configuration is refused with a message naming what differs.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
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
                        rng: list[dict[str, Any]]) -> None:
    """Write the state files into `directory` (a fresh local folder Ray Train then persists)."""
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
             "rng": [{"numpy": r["numpy"], "python": r["python"]} for r in rng]}
    (directory / STATE).write_text(json.dumps(_jsonable(state, "state"), indent=1))


def load_training_state(directory: str | Path) -> TrainingState:
    directory = Path(directory)
    missing = [name for name in (STATE, TRAINABLE, OPTIMIZER, RNG) if not (directory / name).is_file()]
    if missing:
        raise NullBoothError(f"checkpoint {directory}: {', '.join(missing)} missing; it was not written by "
                             "NullBooth's training (use another train.name)")
    state = json.loads((directory / STATE).read_text())
    opt_tensors = load_file(str(directory / OPTIMIZER))
    per_param: dict[int, dict[str, Any]] = {}
    for key, value in list(opt_tensors.items()) + list(state["optimizer"]["scalars"].items()):
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    rng_tensors = load_file(str(directory / RNG))
    rng = [{"torch": rng_tensors[f"torch.{rank}"], "cuda": rng_tensors.get(f"cuda.{rank}"), **entry}
           for rank, entry in enumerate(state["rng"])]
    report_path = directory / REPORT
    return TrainingState(
        step=int(state["step"]), samples_seen=int(state["samples_seen"]), signature=state["signature"],
        trainable=load_file(str(directory / TRAINABLE)),
        optimizer={"state": per_param, "param_groups": state["optimizer"]["param_groups"]},
        lr_scheduler=state["lr_scheduler"], rng=rng,
        report=json.loads(report_path.read_text()) if report_path.is_file() else None)


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
