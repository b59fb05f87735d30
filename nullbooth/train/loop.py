"""`train_loop_per_worker`: what each Ray Train worker runs.

Every worker builds a `Worker` (the frozen pipeline + LoRA + projection), restores the latest checkpoint if Ray
Train hands one over (after a worker failure, or when a run is started again with the same storage_path and name),
wraps the UNet in DDP (gloo on CPU, NCCL on GPU; Ray Train set up the process group) and runs the optimizer steps.

Reporting follows Ray Train V2's rules: every worker calls `ray.train.report` at the same steps (each call is a
barrier), only rank 0 attaches a checkpoint. Reports happen every `train.metrics_every` steps, every
`train.checkpoint_every` steps (with a checkpoint) and at the last step (with a checkpoint), not every step: each
report synchronises the workers with the controller. Per-step losses go to the progress bar and into report.json.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from nullbooth import telemetry
from nullbooth.layout import (
    FAIL_MARKER,
    LORA_DIR,
    REPORT_NAME,
    checkpoint_dir_name,
    validation_file,
)
from nullbooth.models.backends import torch_threads_for
from nullbooth.storage import RunDir
from nullbooth.train.checkpoint import load_training_state, save_training_state
from nullbooth.train.export import save_lora


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train entry point. `loop_config`: config, plan, signature, instance/class image ObjectRefs,
    experiment (storage_path/name, for the test aid's marker)."""
    import json

    import ray
    import ray.train
    import ray.train.torch

    from nullbooth.train.worker import Worker

    config, plan = loop_config["config"], loop_config["plan"]
    tc = config.train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch_threads_for(tc.cpus_per_worker)

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory)
        if state.step >= tc.max_train_steps:
            return state.report  # a finished run started again: nothing to do, its checkpoint is the result

    instance = ray.get(loop_config["instance_images"])
    klass = ray.get(loop_config["class_images"]) if loop_config["class_images"] is not None else None
    worker = Worker(config, plan, instance, klass, ray.train.torch.get_device(), rank, world,
                    signature=loop_config["signature"], measure=rank == 0)
    if state is not None:
        worker.restore(state)
    elif rank == 0:
        worker.eval_loss_initial = worker.eval_loss()
    worker.model = ray.train.torch.prepare_model(worker.unet, move_to_device=False,
                                                 parallel_strategy="ddp" if world > 1 else None)

    bar = telemetry.progress(tc.max_train_steps, f"train ({plan.mode})", unit="step") if rank == 0 else None
    if bar is not None and worker.step:
        bar.update(worker.step)
    gauges = _Gauges() if rank == 0 else None
    window: list[dict[str, float]] = []
    report = None
    while worker.step < tc.max_train_steps:
        step = worker.step + 1
        _maybe_fail(tc.fail_at_step, step, rank, loop_config["experiment"])
        started = time.perf_counter()
        out = worker.train_step()
        out["step_time"] = time.perf_counter() - started
        window.append(out)
        if rank == 0:
            bar.update(1)
            gauges.step(out)
            if tc.validation_prompts and (step % tc.validation_every == 0 or step == tc.max_train_steps):
                RunDir(config.run_dir).write_bytes(validation_file(step),
                                                   worker.validation_grid(tc.validation_prompts))
        last = step == tc.max_train_steps
        save = last or step % tc.checkpoint_every == 0
        if not (save or last or step % tc.metrics_every == 0):
            continue
        metrics = _window_metrics(step, window)
        window = []
        if save:
            rng = gather(worker.rng(), world)  # collectives: every rank takes part
            replica_diff = replica_max_abs_diff(worker, world)
        if rank == 0:
            preservation = worker.preservation()
            if preservation is not None:
                metrics.update(_flat_preservation(preservation))
                gauges.preservation(preservation)
        if not save:
            ray.train.report(metrics)
            continue
        if rank != 0:
            ray.train.report(metrics)
            continue
        with tempfile.TemporaryDirectory(prefix="nullbooth-ckpt-") as directory:
            save_training_state(directory, step=worker.step, samples_seen=worker.samples_seen,
                                signature=worker.signature, trainable=worker.trainable, optimizer=worker.optimizer,
                                lr_scheduler=worker.lr_scheduler, rng=rng)
            save_lora(type(worker.pipe), Path(directory) / LORA_DIR, worker.pairs, worker.lora_config)
            report = worker.report(replica_diff)
            (Path(directory) / REPORT_NAME).write_text(json.dumps(report, indent=1))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory),
                             checkpoint_dir_name=checkpoint_dir_name(step))
    if bar is not None:
        bar.close()
    return report if rank == 0 else None


def _window_metrics(step: int, window: list[dict[str, float]]) -> dict[str, float]:
    """Means of the losses since the last report, the latest learning rate and the median step time."""
    return {"step": step, "loss": statistics.fmean(w["loss"] for w in window),
            "instance_loss": statistics.fmean(w["instance_loss"] for w in window),
            "prior_loss": statistics.fmean(w["prior_loss"] for w in window), "lr": window[-1]["lr"],
            "step_time": statistics.median(w["step_time"] for w in window)}


def _flat_preservation(preservation: dict) -> dict[str, float]:
    flat = {"preservation_error": preservation["overall"], "preservation_error_max": preservation["max"]}
    flat.update({f"preservation_error/{name}": v for name, v in preservation["per_layer"].items()})
    return flat


class _Gauges:
    """Ray dashboard metrics of rank 0."""

    def __init__(self):
        self.loss = telemetry.gauge("train_loss", "training loss (global batch mean)")
        self.lr = telemetry.gauge("train_lr", "learning rate")
        self.step_time = telemetry.gauge("train_step_time_s", "seconds per optimizer step")
        self.steps = telemetry.counter("train_steps", "optimizer steps done")
        self.error = telemetry.gauge("train_preservation_error", "preservation error of a protected layer",
                                     tag_keys=("layer",))

    def step(self, out: dict[str, float]) -> None:
        self.loss.set(out["loss"])
        self.lr.set(out["lr"])
        self.step_time.set(out["step_time"])
        self.steps.inc()

    def preservation(self, preservation: dict) -> None:
        self.error.set(preservation["overall"], tags={"layer": "overall"})
        for name, value in preservation["per_layer"].items():
            self.error.set(value, tags={"layer": name})


def gather(obj: Any, world: int) -> list[Any]:
    """Every rank's `obj`, in rank order (an in-memory collective; nothing is written)."""
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out


def replica_max_abs_diff(worker, world: int) -> float:
    """Largest difference between any rank's LoRA parameters and rank 0's (0.0 when DDP keeps them in step)."""
    if world == 1:
        return 0.0
    import torch.distributed as dist

    flat = torch.cat([p.detach().float().reshape(-1) for p in worker.trainable.values()])
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    parts = [torch.empty_like(flat, device=device) for _ in range(world)]
    dist.all_gather(parts, flat.to(device))
    return max(float((part - parts[0]).abs().max()) for part in parts)


def _maybe_fail(fail_at_step: int | None, step: int, rank: int, experiment: str) -> None:
    """TEST AID (train.fail_at_step): worker 0 raises once at that step, on the first attempt only."""
    if fail_at_step is None or step != fail_at_step or rank != 0:
        return
    marker = RunDir(experiment)
    if marker.exists(FAIL_MARKER):
        return
    marker.write_bytes(FAIL_MARKER, b"failed once\n")
    raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")
