"""Stage 1, `build_covariance`: collector actors → tree reduction → eigendecomposition tasks → the run's files.

1. Read the preserved prompts (the last `preserve.holdout` are held out), check an existing run: a complete run made
   with the same config and model is reused; a different one is refused unless `force`. Check the UNet's layers
   against `covariance.layers` from its config alone, before any actor starts.
2. Connect to Ray, start `covariance.num_workers` collector actors (stats/collector.py) and deal them fixed prompt
   batches (stats/dealer.py), redoing every batch of an actor that dies.
3. Per timestep, tree-reduce the live actors' sums among the actors (stats/reduce.py; an actor lost meanwhile is
   replaced and that key reduced again, stats/dealer.py), write the mean covariances, and queue their
   eigendecompositions (stats/decompose.py, stats/spectrum.py) in groups of `covariance.eigh_group_size` (layers
   and timesteps mixed); the global covariance is the mean over the plan's UNet calls (a timestep the plan repeats
   is reduced once and weighted by its calls, see stats/moments.py), the text covariance is reduced once.
   The math of every step is in stats/moments.py; this module only orchestrates.
4. Release the actors, collect the bases as they finish and write each projection file when complete, then write
   the manifest last. On any error every file written so far is removed: nothing half-written is left behind.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import nullbooth
from nullbooth import telemetry
from nullbooth.cluster import cluster_has_gpu, connect
from nullbooth.config import Config, with_absolute_paths
from nullbooth.errors import NullBoothError
from nullbooth.layout import COVARIANCE_DIR as COVARIANCE_DIR
from nullbooth.layout import MANIFEST, covariance_file
from nullbooth.layout import PROJECTION_DIR as PROJECTION_DIR
from nullbooth.models.backends import get_backend
from nullbooth.models.layers import find_protected_layers
from nullbooth.prompts import preserved_prompts
from nullbooth.stats.dealer import Dealer, make_batches
from nullbooth.stats.decompose import Decomposer
from nullbooth.stats.manifest import (
    FORMAT_VERSION,
    Manifest,
    changed_file_error,
    changed_files,
    has_manifest,
    manifest_mismatches,
    missing_files,
    read_manifest,
    result_config,
    split_layers,
)
from nullbooth.stats.moments import (
    State,
    add_to_timestep_sum,
    state_mean,
    state_means,
    timestep_calls,
    timestep_mean,
)
from nullbooth.stats.spectrum import Spectrum
from nullbooth.stats.store import STORED_DTYPES
from nullbooth.stats.summary import empty_null_spaces, summarize
from nullbooth.stats.writer import Writer
from nullbooth.storage import RunDir

logger = logging.getLogger(__name__)
Prompts = tuple[list[str], list[str]]  # (preserved prompts, held-out prompts)


def build_covariance(config: Config, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the statistics of `config.run_dir`; returns the summary dict."""
    config = with_absolute_paths(config)  # actors and workers run elsewhere than the driver's cwd
    started = time.time()
    prompts = preserved_prompts(config)
    run = RunDir(config.run_dir)
    candidate = _check_existing(run, config, prompts, force)
    _check_model(config)
    connect(config.ray)
    dealer = Dealer(config, make_batches(prompts[0], config.covariance.batch_size))
    try:
        # A run that may be reused needs only one replica, to fingerprint the model; otherwise start them all.
        info = dealer.start(1 if candidate is not None else None)
        if candidate is not None and _reusable(run, candidate, config, info, prompts, force):
            return _summary(candidate, run, reused=True)
        manifest = _build(config, run, dealer, prompts, started)
    finally:
        dealer.shutdown()
    return _summary(manifest, run, reused=False)


def _summary(manifest: Manifest, run: RunDir, reused: bool) -> dict[str, Any]:
    """The end-of-stage summary (the CLI prints it with stats.summary.format_summary)."""
    return summarize(manifest, _where(run), reused=reused)


def _build(config: Config, run: RunDir, dealer: Dealer, prompts: Prompts, started: float) -> Manifest:
    """Start every actor, clear the old run, then collect, reduce and decompose; the manifest is written last."""
    info = dealer.start()
    _clear(run)
    writer = Writer(run)
    try:
        result = _collect_and_decompose(config, dealer, info, writer, len(prompts[0]))
        result["files"] = dict(writer.digests)
        manifest = Manifest.from_json(_manifest(config, info, *prompts, result, dealer, started))
        _check_null_spaces(config, manifest)
        run.write_json(MANIFEST, manifest.to_json())  # last: its presence marks the run complete
    except BaseException:
        writer.remove_all()
        raise
    return manifest


def _check_null_spaces(config: Config, manifest: Manifest) -> None:
    """Refuse a threshold that leaves every protected layer an empty null space (nothing could be learned)."""
    _, empty = empty_null_spaces(manifest)
    if len(empty) == len(manifest.layers):
        thr = config.projection.threshold
        raise NullBoothError(f"projection.threshold: with kind={thr.kind} value={thr.value:g} every protected "
                             "layer has an empty null space, so no update could be learned; raise the threshold")


def _where(run: RunDir) -> str:
    """The run's location to print: absolute for a local path (a relative run_dir inside a submitted Ray job lands
    in the job's working-dir copy, which is worth seeing), the URI otherwise."""
    return run.root if run.is_local and not run.location.startswith("file://") else run.uri()


# -- the existing run ------------------------------------------------------------------------------------------------
def _refusal(run: RunDir, diffs: list[str]) -> str:
    return (f"{run.uri(MANIFEST)}: a complete statistics run made with a different config or model is there; "
            f"pass --force to overwrite it, or choose another run_dir. Differences: " + "; ".join(diffs))


def _check_existing(run: RunDir, config: Config, prompts: Prompts, force: bool) -> Manifest | None:
    """A complete run whose config matches (its model fingerprint is checked once the actors are up), or None.

    A matching run whose files no longer have the digests its manifest records is refused (before Ray starts)
    unless `force`: it must not be reported as a complete run, nor silently replaced.
    """
    if not has_manifest(run):
        return None
    try:
        manifest = read_manifest(run)
    except NullBoothError as err:
        if force:
            return None
        raise NullBoothError(f"{err}; pass --force to rebuild the statistics") from None
    diffs = manifest_mismatches(manifest, config, prompts=prompts)
    if diffs and not force:
        raise NullBoothError(_refusal(run, diffs))
    changed = [] if diffs else changed_files(run, manifest)
    if changed and not force:
        raise changed_file_error(run, changed[0])
    return None if diffs or changed else manifest


def _reusable(run: RunDir, candidate: Manifest, config: Config, info: dict, prompts: Prompts, force: bool) -> bool:
    """True if the complete run `candidate` belongs to this config and model and has all its files; a different one
    is refused unless `force`; one that lost files is rebuilt with a warning."""
    diffs = manifest_mismatches(candidate, config, info["fingerprint"], timesteps=info["timesteps"], prompts=prompts)
    missing = missing_files(run, candidate)
    if not diffs and not missing:
        return True
    if diffs and not force:
        raise NullBoothError(_refusal(run, diffs))
    if missing:  # same config, but files were lost since: rebuilding loses nothing
        logger.warning("nullbooth: %s lacks %d statistics files (e.g. %s); rebuilding", run.uri(), len(missing),
                       missing[0])
    return False


def _check_model(config: Config) -> None:
    """Refuse a model without cross-attention or a layer filter that matches nothing before any actor starts.

    The UNet is built from its config on the meta device (no weights, about a second for SD1.5). A local folder must
    be readable here (the config checks made sure it exists); only a hub id that is not cached on this machine is
    left to the actors, which download it.
    """
    from diffusers import UNet2DConditionModel

    backend = get_backend(config)
    location = backend.location
    try:
        unet_config = UNet2DConditionModel.load_config(location, subfolder="unet", revision=config.model.revision)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
    except (OSError, ValueError, TypeError) as err:
        if not Path(location).is_dir():
            return
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise NullBoothError(f"model.path: cannot read the UNet of {config.model.path!r}: {first_line}") from None
    backend.check_unet(unet)
    find_protected_layers(unet, config.covariance.layers)


def _clear(run: RunDir) -> None:
    """Remove an old or incomplete run's statistics, the manifest first, so nothing stale looks complete."""
    run.delete(MANIFEST)
    run.delete(COVARIANCE_DIR)
    run.delete(PROJECTION_DIR)


# -- collection, reduction, decomposition ----------------------------------------------------------------------------
def _collect_and_decompose(config: Config, dealer: Dealer, info: dict, writer: Writer, n_prompts: int) -> dict:
    bar = telemetry.progress(n_prompts, "covariance: prompts sampled", unit="prompt")
    # Batches of an actor lost during the reduction are dealt again from there, on the same progress bar.
    redeal = {"on_batch": lambda done: bar.update(done["prompts"]), "on_lost": lambda lost: bar.update(-lost)}
    try:
        dealer.run(**redeal)
        reduced = _reduce(config, dealer, info, writer, redeal)
    finally:
        bar.close()
    dealer.shutdown()  # the actors' resources (GPUs on a cluster) go to the eigendecomposition tasks
    reduced["spectra"] = reduced.pop("decomposer").collect(writer)
    return reduced


@dataclass
class _Outputs:
    """Where each reduced covariance goes: its covariance file (stored dtype) and the eigendecomposition queue."""

    writer: Writer
    decomposer: Decomposer
    dtype: torch.dtype

    def put(self, which: str | int, tensors: dict[str, np.ndarray], queue: dict[str, np.ndarray]) -> None:
        """Write covariance/<which> with `tensors`; queue the bases of `queue` (key -> covariance) under `which`."""
        self.writer.tensors(covariance_file(which), tensors, self.dtype)
        for key, cov in queue.items():
            self.decomposer.add(which, key, cov)


def _reduce(config: Config, dealer: Dealer, info: dict, writer: Writer, redeal: dict) -> dict:
    """Tree-reduce "text" then every distinct timestep, writing the mean covariances and queueing their
    eigendecompositions."""
    plan: list[int] = info["timesteps"]
    calls = timestep_calls(plan)
    _, image_layers = split_layers(info["layers"])
    thr = config.projection.threshold
    out = _Outputs(writer, Decomposer(config.covariance.eigh_group_size, thr.kind, thr.value, cluster_has_gpu()),
                   STORED_DTYPES[config.covariance.dtype])
    bar = telemetry.progress(len(calls) + 1, "covariance: tree reduction", unit="state")
    done = telemetry.gauge("stats_reduced_states", "states (text + timesteps) tree-reduced")
    try:
        text_rows = _put_text(dealer.reduce("text", **redeal), out)
        bar.update(1)
        image_rows: dict[str, dict[str, int]] = {}
        timestep_sum: dict[str, np.ndarray] = {}
        for i, (t, n_calls) in enumerate(calls.items()):
            image_rows[str(t)] = _put_timestep(t, n_calls, dealer.reduce(t, **redeal), image_layers, out,
                                               timestep_sum)
            bar.update(1)
            done.set(i + 2)
        global_cov = timestep_mean(timestep_sum, len(plan))
        out.put("global", global_cov, {name: global_cov[name] for name in image_layers})
        out.decomposer.flush()
    except BaseException:
        out.decomposer.cancel()
        raise
    finally:
        bar.close()
    return {"text_rows": text_rows, "image_rows": image_rows, "decomposer": out.decomposer}


def _put_text(text: State, out: _Outputs) -> int:
    """From the reduced text sums: write C[text] and queue its basis (sent with the first timestep's); returns n."""
    cov = state_mean(text, "text")
    out.put("text", {"cov": cov}, {"text": cov})
    return int(text["rows"]["text"])


def _put_timestep(t: int, n_calls: int, total: State, image_layers: list[str], out: _Outputs,
                  timestep_sum: dict[str, np.ndarray]) -> dict[str, int]:
    """From the reduced sums of timestep t (all its `n_calls` UNet calls): write every C[layer, t], queue their
    bases, add them to `timestep_sum` weighted by `n_calls`; returns the image-side layers' row counts at t."""
    missing = [name for name in image_layers if name not in total["rows"]]
    if missing:
        raise NullBoothError(f"covariance.layers: {missing[0]} was never called at timestep {t}; the sampler "
                             "does not run it, so it has no keys to protect")
    covs = state_means(total)
    out.put(t, covs, {name: covs[name] for name in image_layers})
    out.decomposer.flush()  # one timestep's layers at once, so its groups can be balanced by size
    add_to_timestep_sum(timestep_sum, covs, image_layers, n_calls)
    return {name: int(total["rows"][name]) for name in image_layers}


# -- the manifest ----------------------------------------------------------------------------------------------------
def _spectrum_summary(s: Spectrum) -> dict[str, float]:
    return {"tau": float(s.tau), "eig_min": float(s.eigenvalues.min()), "eig_max": float(s.eigenvalues.max())}


def _manifest(config: Config, info: dict, prompts: list[str], holdout: list[str], result: dict, dealer: Dealer,
              started: float) -> dict[str, Any]:
    spectra = result["spectra"]
    plan = info["timesteps"]
    collected = list(timestep_calls(plan))  # distinct, in order of first use: one file and basis each
    _, image_layers = split_layers(info["layers"])
    return {
        "format_version": FORMAT_VERSION,
        "backend": config.model.backend,
        "model": {"path": config.model.path, "revision": config.model.revision, "dtype": config.model.dtype,
                  "fingerprint": info["fingerprint"]},
        "scheduler": info["scheduler"],
        "timesteps": collected,
        "plan": plan,
        "guidance_scale": config.sampling.guidance_scale,
        "uses_guidance": info["uses_guidance"],
        "negative_prompt": config.sampling.negative_prompt,
        "prompts": prompts,
        "holdout_prompts": holdout,
        "text_rows": result["text_rows"],
        "image_rows": result["image_rows"],
        "layers": info["layers"],
        "dtype": config.covariance.dtype,
        "product_dtype": config.covariance.product_dtype,
        "threshold": {"kind": config.projection.threshold.kind, "value": config.projection.threshold.value},
        "null_dims": {"text": spectra["text"]["text"].null_dim,
                      "global": {name: spectra["global"][name].null_dim for name in image_layers},
                      "timesteps": {str(t): {name: spectra[t][name].null_dim for name in image_layers}
                                    for t in collected}},
        "spectra": {"text": _spectrum_summary(spectra["text"]["text"]),
                    "global": {name: _spectrum_summary(spectra["global"][name]) for name in image_layers}},
        "config": result_config(config),
        "files": result["files"],
        "collection": {"num_workers": config.covariance.num_workers, "batch_size": config.covariance.batch_size,
                       "batches": len(dealer.batches), "actor_failures": dealer.failures,
                       "seconds": round(time.time() - started, 3), "device": info["device"],
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "nullbooth_version": nullbooth.__version__},
    }
