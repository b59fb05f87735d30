"""Stage 2, `train(config)`: projected LoRA DreamBooth on Ray Train, from checks to the exported LoRA.

1. Check what a user can get wrong before any worker starts: the instance images (every file must be an image),
   the statistics run (its manifest must match this config and model: backend, model fingerprint, sampler,
   prompts, layers, threshold; and every file the workers will read must load, see inputs.py) and the LoRA targets
   (each needs a basis unless `projection.allow_unprotected`). The model is inspected by one small Ray task (its
   fingerprint and linear layers), so the driver loads no weights.
2. Prior preservation: missing class images are sampled by Ray Data batch inference and cached in run_dir.
3. The training signature (inputs.training_signature: the statistics and images by digest, every hyper-parameter
   that changes the result) is compared with the run name's latest checkpoint: a finished one of this signature
   returns at once (re-exported); one of another signature, trained past max_train_steps, or that fails its digest
   checks is refused by name (`force`, i.e. `--force`: deleted, and training starts afresh).
4. `TorchTrainer` runs `loop.train_loop_per_worker` on `train.num_workers` workers with DDP; RunConfig's
   storage_path/name make a re-run resume from the latest checkpoint, FailureConfig lets Ray Train restart failed
   workers from it.
5. The final checkpoint's diffusers-format LoRA (train.adapter full: the merged UNet, `lora/unet/`) and report.json
   are copied to `run_dir/lora/`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any

import ray

from nullbooth.cluster import connect
from nullbooth.config import Config, with_absolute_paths
from nullbooth.errors import NullBoothError, user_error
from nullbooth.formatting import number
from nullbooth.layout import (
    BASELINE_LORA_DIR,
    LORA_DIR,
    MANIFEST,
    REPORT_NAME,
    TRAIN_DIR,
    is_uri,
    trained_files,
)
from nullbooth.models.backends import get_backend, model_fingerprint
from nullbooth.stats.manifest import Manifest
from nullbooth.storage import RunDir
from nullbooth.train.checkpoint import (
    load_training_state,
    read_state,
    signature_mismatches,
)
from nullbooth.train.data import ensure_class_images, open_instance_images, stack_images
from nullbooth.train.export import local_checkpoint_copy, publish
from nullbooth.train.inputs import (
    check_statistics,
    images_digest,
    statistics_digest,
    training_signature,
)
from nullbooth.train.projection import plan_projection

log = logging.getLogger(__name__)


def train_all(config: Config, force: bool = False) -> list[dict[str, Any]]:
    """The LoRA of `config` and, with train.plain_baseline, the plain LoRA beside it; their summaries. `force`: a
    run name holding a run of another configuration is started afresh instead of refused."""
    summaries = [train(config, force=force)]
    if config.train.plain_baseline:
        summaries.append(train(plain_baseline_config(config), lora_dir=BASELINE_LORA_DIR, force=force))
    return summaries


def plain_baseline_config(config: Config) -> Config:
    """The same training with projection.mode none, under its own Ray Train name (so each resumes on its own)."""
    return dataclasses.replace(config, projection=dataclasses.replace(config.projection, mode="none"),
                               train=dataclasses.replace(config.train, name=f"{config.train.name}-none",
                                                         plain_baseline=False))


def train(config: Config, lora_dir: str = LORA_DIR, force: bool = False) -> dict[str, Any]:
    """Train the LoRA of `config` (resuming or returning at once when its run name has progress) and publish it to
    run_dir/<lora_dir>/; returns a summary. A run name holding a run of another configuration (or an unreadable
    checkpoint) is refused, or with `force` deleted and trained afresh."""
    config = with_absolute_paths(config)  # actors and workers run elsewhere than the driver's cwd
    started = time.time()
    tc = config.train
    images = open_instance_images(tc.instance_data_dir, config.model.path)  # user errors first, before Ray starts
    run = RunDir(config.run_dir)
    manifest = _read_statistics(config, run)
    connect(config.ray)
    probe = _run_probe(config)
    if manifest is not None:
        _check_manifest(run, manifest, config, probe["fingerprint"])
    plan = plan_projection(config, manifest, probe["targets"])
    resolution = tc.resolution or probe["native_resolution"]
    if resolution % probe["pixels_per_latent_cell"]:
        raise NullBoothError(f"train.resolution: {resolution} is not a multiple of {probe['pixels_per_latent_cell']} "
                             f"(the VAE's downsampling times the UNet's), which {config.model.path!r} needs")
    digests = {"statistics": None}
    if plan.has_statistics:  # every file the workers will read, checked here: a bad one is refused before Ray Train
        manifest, plan.files = check_statistics(config, plan)
        digests["statistics"] = statistics_digest(manifest, plan.files)
    instance = stack_images([img for _, img in images], resolution)
    klass = stack_images(ensure_class_images(config), resolution) if tc.with_prior_preservation else None
    digests.update(instance_images=images_digest(instance), class_images=images_digest(klass))
    signature = training_signature(config, plan, probe["fingerprint"], resolution, digests,
                                   manifest.threshold if manifest else None)
    experiment = f"{storage_location(config)}/{tc.name}"

    finished = _finished_checkpoint(config, experiment, signature, force)
    if finished is not None:
        log.info("%s already reached step %d: re-exporting its checkpoint", experiment, tc.max_train_steps)
        return _summarize(config, run, finished, started, already_finished=True, lora_dir=lora_dir)

    loop_config = {"config": config, "plan": plan, "signature": signature, "experiment": experiment,
                   "instance_images": ray.put(instance), "class_images": ray.put(klass) if klass is not None else None}
    result = _fit(config, loop_config)
    return _summarize(config, run, result.checkpoint, started, already_finished=False, lora_dir=lora_dir)


# ---------------------------------------------------------------------------------------------------------------
# Checks


def _read_statistics(config: Config, run: RunDir) -> Manifest | None:
    """The run's manifest; None only for projection.mode none without statistics (nothing is measured then)."""
    from nullbooth.stats.manifest import has_manifest, read_manifest

    if config.projection.mode == "none" and not has_manifest(run):
        return None
    return read_manifest(run)


def _run_probe(config: Config) -> dict[str, Any]:
    try:
        return ray.get(_probe.remote(config))
    except ray.exceptions.RayTaskError as err:
        found = user_error(err)  # a model or target problem: one clean message, not a remote traceback
        if found is None:
            raise
        raise found from None


def _check_manifest(run: RunDir, manifest: Manifest, config: Config, fingerprint: str) -> None:
    from nullbooth.stats.manifest import manifest_mismatches

    diffs = manifest_mismatches(manifest, config, fingerprint)
    if diffs:
        raise NullBoothError(f"{run.uri(MANIFEST)}: the statistics run was made for another "
                             f"model or config; rebuild it (nullbooth build-cov --force) or use another run_dir. "
                             f"Differences: {'; '.join(diffs)}")


@ray.remote(num_cpus=1)
def _probe(config: Config) -> dict[str, Any]:
    """What the driver needs to know about the model: fingerprint, LoRA targets, native resolution."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from nullbooth.models.backends import DTYPES
    from nullbooth.models.layers import find_protected_layers

    backend = get_backend(config)
    kwargs = {"subfolder": "unet", "revision": config.model.revision, "torch_dtype": DTYPES[config.model.dtype]}
    try:
        unet = UNet2DConditionModel.from_pretrained(backend.location, **kwargs)
        vae_config = AutoencoderKL.load_config(backend.location, subfolder="vae", revision=config.model.revision)
    except (OSError, ValueError) as err:
        raise NullBoothError(f"model.path: cannot load the UNet of {config.model.path!r}: {err}") from None
    backend.check_unet(unet)
    patterns = config.train.target_modules or config.covariance.layers
    key = "train.target_modules" if config.train.target_modules else "covariance.layers"
    targets = find_protected_layers(unet, patterns, key=key)
    vae_scale = 2 ** (len(vae_config["block_out_channels"]) - 1)
    unet_scale = 2 ** (len(unet.config.block_out_channels) - 1)
    return {"fingerprint": model_fingerprint(unet),
            "targets": {name: int(layer.in_features) for name, layer in targets.items()},
            "native_resolution": int(unet.config.sample_size) * vae_scale,
            "pixels_per_latent_cell": vae_scale * unet_scale}


def storage_location(config: Config) -> str:
    """Ray Train's storage_path: train.storage_path, else run_dir/train (local paths made absolute)."""
    location = config.train.storage_path or f"{config.run_dir.rstrip('/')}/{TRAIN_DIR}"
    return location if is_uri(location) else os.path.abspath(os.path.expanduser(location))


# ---------------------------------------------------------------------------------------------------------------
# Ray Train


def _fit(config: Config, loop_config: dict[str, Any]):
    from ray.train import (
        CheckpointConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    from nullbooth.train.loop import train_loop_per_worker

    tc = config.train
    trainer = TorchTrainer(
        train_loop_per_worker, train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                     resources_per_worker={"CPU": tc.cpus_per_worker}),
        run_config=RunConfig(storage_path=storage_location(config), name=tc.name,
                             checkpoint_config=CheckpointConfig(num_to_keep=tc.checkpoints_to_keep),
                             failure_config=FailureConfig(max_failures=tc.max_failures),
                             # At INFO Ray Train echoes every reported metrics dict (one error per protected layer)
                             # to the console; the metrics still reach the dashboard, and our own bar shows progress.
                             logging_config=LoggingConfig(log_level="WARNING")))
    try:
        result = trainer.fit()
    except Exception as err:
        found = _worker_user_error(err)
        if found is not None:
            raise found from None
        raise
    if result.checkpoint is None:
        raise RuntimeError("Ray Train finished without a checkpoint")  # the loop always checkpoints its last step
    return result


def _worker_user_error(err: BaseException) -> NullBoothError | None:
    """The NullBoothError a worker raised (Ray Train wraps it in a WorkerGroupError), if any."""
    failures = getattr(err, "worker_failures", None) or {}
    for failure in list(failures.values()) + [err]:
        found = user_error(failure)
        if found is not None:
            return found
    return None


def _finished_checkpoint(config: Config, experiment: str, signature: dict[str, Any], force: bool):
    """The latest checkpoint of `experiment` if it reached train.max_train_steps with this signature; None when
    there is none or it is to be resumed.

    A checkpoint that does not load (every file is checked against its state.json), of another configuration, or
    trained past max_train_steps is refused with what is wrong; with `force`, the run name is deleted instead, so
    training starts afresh."""
    from ray.train import Result

    try:
        checkpoint = Result.from_path(experiment).checkpoint
    except (RuntimeError, FileNotFoundError, OSError, ValueError):
        return None  # no such run yet (or no checkpoint manager snapshot)
    if checkpoint is None:
        return None
    name, steps = config.train.name, config.train.max_train_steps
    try:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory)
        diffs = signature_mismatches(state.signature, signature)
        problem = (f"{experiment} holds a run with another configuration ({'; '.join(diffs)})" if diffs else
                   f"{experiment} holds a run trained to step {state.step}, past train.max_train_steps {steps}"
                   if state.step > steps else None)
    except NullBoothError as err:
        problem = str(err)
    if problem is None:
        return checkpoint if state.step == steps else None
    if not force:
        raise NullBoothError(f"train.name {name!r}: {problem}; choose another train.name or storage_path, or "
                             f"pass --force to delete this run and train afresh")
    log.warning("train.name %r: %s; --force: deleting it and training afresh", name, problem)
    RunDir(storage_location(config)).delete(name)
    return None


# ---------------------------------------------------------------------------------------------------------------
# Export and summary


def _summarize(config: Config, run: RunDir, checkpoint, started: float, already_finished: bool,
               lora_dir: str) -> dict[str, Any]:
    import json

    directory, cleanup = local_checkpoint_copy(checkpoint)
    try:
        adapter = config.train.adapter
        # what is published is what was trained
        read_state(directory, required=(*(f"{LORA_DIR}/{rel}" for rel in trained_files(adapter)), REPORT_NAME))
        lora_dir = publish(run, directory, lora_dir, adapter)
        with open(os.path.join(directory, REPORT_NAME)) as f:
            report = json.load(f)
    finally:
        cleanup()
    preservation = report.get("preservation") or {}
    summary = {"run_dir": run.uri(), "lora_dir": lora_dir, "checkpoint": checkpoint.path,
               "already_finished": already_finished, "mode": report["mode"], "steps": report["step"],
               "final_loss": report["final_loss"], "preservation_error": preservation.get("overall"),
               "resumed_from": report["resumed_from"], "elapsed_s": round(time.time() - started, 2), "report": report}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    report = summary["report"]
    head = "already finished, re-exported" if summary["already_finished"] else "trained"
    error = summary["preservation_error"]
    evals = report["eval_loss"]
    adapter = "full" if report.get("adapter") == "full" else "LoRA"
    lines = [f"nullbooth train: {head} {summary['steps']} steps ({adapter}, {summary['mode']}) -> "
             f"{summary['lora_dir']}",
             f"  final loss {number(summary['final_loss'])}, eval loss {number(evals['initial'])} -> "
             f"{number(evals['final'])}, "
             f"preservation error {number(error)}"
             + (f", resumed from step(s) {summary['resumed_from']}" if summary["resumed_from"] else "")]
    if report["unprotected"] and report["mode"] != "none":
        lines.append(f"  unprotected LoRA targets (no basis): {', '.join(report['unprotected'])}")
    return "\n".join(lines)
