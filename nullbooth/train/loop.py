"""`train_loop_per_worker`: what each Ray Train worker runs.

Every worker builds a `Worker` (the frozen pipeline + LoRA + projection), restores the latest checkpoint if Ray
Train hands one over (after a worker failure, or when a run is started again with the same storage_path and name),
wraps the UNet in DDP (gloo on CPU, NCCL on GPU; Ray Train set up the process group) and runs the optimizer steps.

Reporting follows Ray Train V2's idiom, in one place (`_report`): every worker calls `ray.train.report` at the
same steps (each call is a barrier), and only rank 0 attaches a checkpoint, built in a temporary directory. Reports
happen every `train.metrics_every` steps, every `train.checkpoint_every` steps (with a checkpoint) and at the last
step (with a checkpoint), not every step: each report synchronises the workers with the controller. Per-step
losses go to the progress bar and into report.json.
"""

from __future__ import annotations

import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from nullbooth import telemetry
from nullbooth.config import TrainConfig
from nullbooth.layout import (
    FAIL_MARKER,
    LORA_DIR,
    REPORT_NAME,
    checkpoint_dir_name,
    validation_file,
)
from nullbooth.models.backends import torch_threads_for
from nullbooth.storage import RunDir
from nullbooth.train.checkpoint import (
    TrainingState,
    load_training_state,
    save_training_state,
)
from nullbooth.train.distributed import data_parallel, gather, replica_max_abs_diff
from nullbooth.train.export import save_lora
from nullbooth.train.full import save_unet

log = logging.getLogger(__name__)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The Ray Train entry point. `loop_config`: config, plan, signature, instance/class image ObjectRefs,
    experiment (storage_path/name, for the test aid's marker). Returns rank 0's last report (None elsewhere)."""
    import ray.train

    tc = loop_config["config"].train
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch_threads_for(tc.cpus_per_worker)
    _quiet_report_dumps()
    state = _latest_state()
    if state is not None and state.step >= tc.max_train_steps:
        return state.report  # a finished run started again: nothing to do, its checkpoint is the result
    worker = _make_worker(loop_config, state, rank, world)
    progress = _Progress(tc.max_train_steps, loop_config["plan"].mode, worker.step) if rank == 0 else None
    window: list[dict[str, float]] = []
    report = None
    while worker.step < tc.max_train_steps:
        window.append(_train_step(worker, loop_config["experiment"], progress))
        if _reports_at(worker.step, tc):
            report = _report(worker, _window_metrics(worker.step, window), progress) or report
            window = []
    if progress is not None:
        progress.close()
    return report


def _quiet_report_dumps() -> None:
    """Silence Ray Train's per-report INFO line, which prints every metric of every report.

    Ray Train logs it through a logger named after its source file, not under `ray.train`, so the run's
    `LoggingConfig(log_level="WARNING")` does not reach it; raise that logger's level here, in the worker.
    """
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def _latest_state() -> TrainingState | None:
    """The training state of the checkpoint Ray Train hands over (after a worker failure, or a re-run), if any."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        return load_training_state(directory)


def _make_worker(loop_config: dict[str, Any], state: TrainingState | None, rank: int, world: int):
    """This rank's Worker, restored from `state` (or with its initial eval loss measured), its UNet under DDP."""
    import ray
    import ray.train.torch

    from nullbooth.train.worker import Worker

    klass_ref = loop_config["class_images"]
    worker = Worker(loop_config["config"], loop_config["plan"], ray.get(loop_config["instance_images"]),
                    ray.get(klass_ref) if klass_ref is not None else None, ray.train.torch.get_device(), rank, world,
                    signature=loop_config["signature"], measure=rank == 0)
    if state is not None:
        worker.restore(state)
        log.info("rank %d resumes at step %d", rank, state.step)
    elif rank == 0:
        worker.eval_loss_initial = worker.eval_loss()
    worker.model = data_parallel(worker.unet, world)
    return worker


def _train_step(worker, experiment: str, progress: _Progress | None) -> dict[str, float]:
    """One optimizer step (and, on rank 0, the progress bar, gauges and validation grid); returns its losses."""
    tc, step = worker.tc, worker.step + 1
    _maybe_fail(tc.fail_at_step, step, worker.rank, experiment)
    started = time.perf_counter()
    out = worker.train_step()
    out["step_time"] = time.perf_counter() - started
    if progress is not None:
        progress.step(out)
        if tc.validation_prompts and (step % tc.validation_every == 0 or step == tc.max_train_steps):
            RunDir(worker.config.run_dir).write_bytes(validation_file(step),
                                                      worker.validation_grid(tc.validation_prompts))
    return out


def _reports_at(step: int, tc: TrainConfig) -> bool:
    return step == tc.max_train_steps or step % tc.checkpoint_every == 0 or step % tc.metrics_every == 0


def _saves_at(step: int, tc: TrainConfig) -> bool:
    return step == tc.max_train_steps or step % tc.checkpoint_every == 0


def _report(worker, metrics: dict[str, float], progress: _Progress | None) -> dict[str, Any] | None:
    """Report `metrics` to Ray Train: every rank calls this at the same steps (each report is a barrier), and at
    save steps rank 0 alone attaches a checkpoint. Returns the checkpoint's report.json content (rank 0 at save
    steps; None otherwise)."""
    import ray.train

    step, rank = worker.step, worker.rank
    save = _saves_at(step, worker.tc)
    rng = replica_diff = None
    if save:  # collectives: every rank takes part, rank 0 alone uses the result
        rng = gather(worker.rng(), worker.world)
        replica_diff = replica_max_abs_diff(worker.trainable.values(), worker.world)
    if rank == 0:
        preservation = worker.preservation()
        if preservation is not None:
            metrics.update(_flat_preservation(preservation))
            progress.preservation(preservation)
    report = None
    with tempfile.TemporaryDirectory(prefix="nullbooth-ckpt-") as directory:
        checkpoint = None
        if save and rank == 0:
            report = _write_checkpoint(Path(directory), worker, rng, replica_diff)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_dir_name=checkpoint_dir_name(step) if save else None)
    return report


def _write_checkpoint(directory: Path, worker, rng: list[dict], replica_diff: float) -> dict[str, Any]:
    """Everything an exact resume needs, the diffusers-format LoRA (or merged UNet) and report.json; returns the
    report.
    The training state goes last: its state.json records the digests of the other files."""
    if worker.full is not None:
        save_unet(worker.unet, directory / LORA_DIR)  # train.adapter full: the merged UNet in lora/unet/
    else:
        save_lora(type(worker.pipe), directory / LORA_DIR, worker.pairs, worker.lora_config)
    report = worker.report(replica_diff)
    (directory / REPORT_NAME).write_text(json.dumps(report, indent=1))
    save_training_state(directory, step=worker.step, samples_seen=worker.samples_seen, signature=worker.signature,
                        trainable=worker.trainable, optimizer=worker.optimizer, lr_scheduler=worker.lr_scheduler,
                        rng=rng, scaler=worker.scaler)
    log.debug("checkpoint of step %d written to %s", worker.step, directory)
    return report


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


class _Progress:
    """Rank 0's progress bar and Ray dashboard metrics."""

    def __init__(self, max_train_steps: int, mode: str, done: int):
        self.bar = telemetry.progress(max_train_steps, f"train ({mode})", unit="step")
        if done:
            self.bar.update(done)
        self.loss = telemetry.gauge("train_loss", "training loss (global batch mean)")
        self.lr = telemetry.gauge("train_lr", "learning rate")
        self.step_time = telemetry.gauge("train_step_time_s", "seconds per optimizer step")
        self.steps = telemetry.counter("train_steps", "optimizer steps done")
        self.error = telemetry.gauge("train_preservation_error", "preservation error of a protected layer",
                                     tag_keys=("layer",))

    def step(self, out: dict[str, float]) -> None:
        self.bar.update(1)
        self.loss.set(out["loss"])
        self.lr.set(out["lr"])
        self.step_time.set(out["step_time"])
        self.steps.inc()

    def preservation(self, preservation: dict) -> None:
        self.error.set(preservation["overall"], tags={"layer": "overall"})
        for name, value in preservation["per_layer"].items():
            self.error.set(value, tags={"layer": name})

    def close(self) -> None:
        self.bar.close()


def _maybe_fail(fail_at_step: int | None, step: int, rank: int, experiment: str) -> None:
    """TEST AID (train.fail_at_step): worker 0 raises once at that step, on the first attempt only."""
    if fail_at_step is None or step != fail_at_step or rank != 0:
        return
    marker = RunDir(experiment)
    if marker.exists(FAIL_MARKER):
        return
    marker.write_bytes(FAIL_MARKER, b"failed once\n")
    raise RuntimeError(f"injected failure at step {step} (train.fail_at_step)")
