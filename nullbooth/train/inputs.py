"""What a training run reads, checked on the driver before Ray Train starts, and the signature made of it.

Statistics. `statistics_reads` lists every statistics file a worker reads (the manifest, the bases of the mode, the
covariances of the preservation meter). `check_statistics` reads them all on the driver through the stage's own
loaders, so a truncated, tampered or foreign file is refused with one line naming it before any worker starts, and
records the sha256 of each; the workers read through `CheckedRun`, which refuses a file whose bytes are not the
ones the driver checked (changed while the run was starting).

Signature. `training_signature` is what a checkpoint must agree on to be resumed, or returned as already finished:
everything that changes the trained weights — the model, the statistics (a digest of the manifest and of the files
read, not just the threshold), the images actually trained on (a digest of the arrays the workers get, so another
folder, or the same folder with other content, differs), the prompts and every hyper-parameter of the loss, the
optimizer, the schedule and the batch. What only changes speed, memory, bookkeeping or how far the run goes
(`max_train_steps` for a schedule that does not depend on it, checkpoint and metric cadence, CPUs, gradient
checkpointing, validation prompts, the run name) may change between runs.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import numpy as np

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import MANIFEST
from nullbooth.stats.manifest import Manifest
from nullbooth.storage import RunDir
from nullbooth.train.projection import ProjectionPlan

# diffusers schedules whose learning rate at a step depends on the total number of training steps.
STEP_DEPENDENT_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial")


# ---------------------------------------------------------------------------------------------------------------
# Statistics files


def statistics_reads(plan: ProjectionPlan, manifest: Manifest, measure: bool) -> list[tuple[str, str | int]]:
    """("bases" | "covariances", "global" or a timestep) for everything a worker loads: the bases of the mode and,
    for the preservation meter (`measure`), the global and per-timestep covariances."""
    reads: list[tuple[str, str | int]] = []
    if plan.protected and plan.mode == "global":
        reads.append(("bases", "global"))
    elif plan.protected and plan.mode == "timestep":
        reads += [("bases", t) for t in plan.timesteps]
    if measure and plan.protected:
        reads += [("covariances", which) for which in ["global", *manifest.timesteps]]
    return reads


def load_statistics(run: RunDir, manifest: Manifest, kind: str, which: str | int) -> dict:
    """One entry of `statistics_reads`: layer -> float64 basis or covariance, checked against the manifest."""
    from nullbooth.stats.store import load_bases, load_layer_covariances

    return (load_bases if kind == "bases" else load_layer_covariances)(run, manifest, which)


class _RecordingRun(RunDir):
    """A RunDir that remembers the sha256 of every file read through it."""

    def __init__(self, location: str):
        super().__init__(location)
        self.digests: dict[str, str] = {}

    def read_bytes(self, rel: str) -> bytes:
        data = super().read_bytes(rel)
        self.digests[rel] = hashlib.sha256(data).hexdigest()
        return data


class CheckedRun(RunDir):
    """The run_dir as a worker reads it: only files the driver checked, with the bytes it checked."""

    def __init__(self, location: str, digests: dict[str, str]):
        super().__init__(location)
        self.digests = dict(digests)

    def read_bytes(self, rel: str) -> bytes:
        if rel not in self.digests:  # statistics_reads and the worker disagree: a bug, not a user error
            raise RuntimeError(f"{self.uri(rel)} was not checked by the driver before training")
        data = super().read_bytes(rel)
        found = hashlib.sha256(data).hexdigest()
        if found != self.digests[rel]:
            raise NullBoothError(f"{self.uri(rel)}: changed after the driver checked it (sha256 {found[:16]}, "
                                 f"checked {self.digests[rel][:16]}); was the statistics run rebuilt meanwhile? "
                                 "Train again")
        return data


def check_statistics(config: Config, plan: ProjectionPlan) -> tuple[Manifest, dict[str, str]]:
    """Read every statistics file the workers will read, as they will (one at a time, nothing kept); returns the
    manifest and each file's sha256. A bad file is a NullBoothError naming it."""
    from nullbooth.stats.manifest import read_manifest

    run = _RecordingRun(config.run_dir)
    manifest = read_manifest(run)
    for kind, which in statistics_reads(plan, manifest, measure=True):
        load_statistics(run, manifest, kind, which)
    return manifest, run.digests


def statistics_digest(manifest: Manifest, files: dict[str, str]) -> str:
    """The identity of a statistics run as training uses it: the manifest's content (but when and by how many
    actors it was collected) and the sha256 of every tensor file read."""
    content = {k: v for k, v in manifest.to_json().items() if k != "collection"}
    tensors = {rel: digest for rel, digest in sorted(files.items()) if rel != MANIFEST}
    return _short(json.dumps({"manifest": content, "files": tensors}, sort_keys=True, default=str).encode())


# ---------------------------------------------------------------------------------------------------------------
# Images and the signature


def images_digest(images: np.ndarray | None) -> str | None:
    """A digest of the uint8 image array the workers train on (its shape included); None without images."""
    if images is None:
        return None
    return _short(repr(images.shape).encode() + np.ascontiguousarray(images).tobytes())


def training_signature(config: Config, plan: ProjectionPlan, fingerprint: str, resolution: int,
                       digests: dict[str, str | None], threshold: dict | None) -> dict[str, Any]:
    """What a checkpoint must agree on to be resumed or returned as finished (see the module docstring).
    `digests`: "statistics", "instance_images", "class_images" (None where there are none)."""
    tc = config.train
    prior = tc.with_prior_preservation
    return {
        "backend": config.model.backend, "model": config.model.path, "revision": config.model.revision,
        "fingerprint": fingerprint, "mode": plan.mode, "targets": list(plan.targets), "protected": plan.protected,
        "threshold": threshold, "statistics": digests["statistics"],
        "instance_images": digests["instance_images"], "instance_prompt": tc.instance_prompt, "resolution": resolution,
        "with_prior_preservation": prior, "class_prompt": tc.class_prompt if prior else None,
        "num_class_images": tc.num_class_images if prior else None, "class_images": digests["class_images"],
        "prior_loss_weight": tc.prior_loss_weight if prior else None,
        "adapter": tc.adapter, "rank": tc.rank if tc.adapter == "lora" else None,
        "alpha": tc.alpha if tc.adapter == "lora" else None, "dropout": tc.dropout, "seed": tc.seed,
        "learning_rate": tc.learning_rate, "lr_scheduler": tc.lr_scheduler, "lr_warmup_steps": tc.lr_warmup_steps,
        "lr_schedule_steps": tc.max_train_steps if tc.lr_scheduler in STEP_DEPENDENT_SCHEDULES else None,
        "max_grad_norm": tc.max_grad_norm, "num_workers": tc.num_workers, "train_batch_size": tc.train_batch_size,
        "gradient_accumulation_steps": tc.gradient_accumulation_steps,
        "mixed_precision": tc.mixed_precision if tc.use_gpu else "no",  # autocast runs on GPU only
        "guidance_scale": config.sampling.guidance_scale if config.model.backend == "lcm" else None,  # timestep_cond
    }


def _short(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
