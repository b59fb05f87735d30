"""Stage 1, `build_covariance`: collector actors → tree reduction → eigendecomposition tasks → the run's files.

1. Read the preserved prompts (the last `preserve.holdout` are held out), check an existing run: a complete run made
   with the same config and model is reused; a different one is refused unless `force`. Check the UNet's layers
   against `covariance.layers` from its config alone, before any actor starts.
2. Connect to Ray, start `covariance.num_workers` collector actors (stats/collector.py) and deal them fixed prompt
   batches (stats/dealer.py), redoing every batch of an actor that dies.
3. Per timestep, tree-reduce the live actors' sums (stats/reduce.py), write the mean covariances, and queue their
   eigendecompositions (stats/spectrum.py) in groups of `covariance.eigh_group_size` (layers and timesteps mixed);
   the global covariance is the mean over timesteps, the text covariance is reduced once.
4. Release the actors, collect the bases as they finish and write each projection file when complete, then write
   the manifest last. On any error every file written so far is removed: nothing half-written is left behind.
"""

from __future__ import annotations

import datetime
import time
from typing import Any

import numpy as np
import ray
import torch
from ray.exceptions import RayActorError, RayTaskError

import nullbooth
from nullbooth import telemetry
from nullbooth.cluster import cluster_has_gpu, connect
from nullbooth.config import Config, with_absolute_paths
from nullbooth.errors import NullBoothError
from nullbooth.layout import COVARIANCE_DIR as COVARIANCE_DIR
from nullbooth.layout import MANIFEST, covariance_file, projection_file
from nullbooth.layout import PROJECTION_DIR as PROJECTION_DIR
from nullbooth.models.backends import get_backend
from nullbooth.models.layers import find_protected_layers
from nullbooth.prompts import preserved_prompts
from nullbooth.stats.dealer import Dealer, make_batches
from nullbooth.stats.hooks import state_means
from nullbooth.stats.manifest import (
    FORMAT_VERSION,
    Manifest,
    has_manifest,
    manifest_mismatches,
    missing_files,
    read_manifest,
    result_config,
)
from nullbooth.stats.reduce import tree_reduce
from nullbooth.stats.spectrum import Spectrum, submit_groups
from nullbooth.stats.store import STORED_DTYPES
from nullbooth.stats.summary import empty_null_spaces, format_summary, summarize
from nullbooth.storage import RunDir


def build_covariance(config: Config, force: bool = False) -> dict[str, Any]:
    """Build (or reuse) the statistics of `config.run_dir`; returns the summary dict (also printed)."""
    config = with_absolute_paths(config)  # actors and workers run elsewhere than the driver's cwd
    started = time.time()
    prompts, holdout = preserved_prompts(config)
    run = RunDir(config.run_dir)
    candidate = _check_existing(run, config, (prompts, holdout), force)
    _check_model(config)
    connect(config.ray)
    dealer = Dealer(config, make_batches(prompts, config.covariance.batch_size))
    try:
        # A run that may be reused needs only one replica, to fingerprint the model; otherwise start them all.
        info = dealer.start(1 if candidate is not None else None)
        if candidate is not None:
            diffs = manifest_mismatches(candidate, config, info["fingerprint"], timesteps=info["timesteps"],
                                        prompts=(prompts, holdout))
            missing = missing_files(run, candidate)
            if not diffs and not missing:
                summary = summarize(candidate, _where(run), reused=True)
                print(format_summary(summary))
                return summary
            if diffs and not force:
                raise NullBoothError(_refusal(run, diffs))
            if missing:  # same config, but files were lost since: rebuilding loses nothing
                print(f"nullbooth: {run.uri()} lacks {len(missing)} statistics files (e.g. {missing[0]}); rebuilding")
        info = dealer.start()
        _clear(run)
        writer = Writer(run)
        try:
            result = _collect_and_decompose(config, dealer, info, writer, len(prompts))
            manifest = Manifest.from_json(_manifest(config, info, prompts, holdout, result, dealer, started))
            _, empty = empty_null_spaces(manifest)
            if len(empty) == len(manifest.layers):
                thr = config.projection.threshold
                raise NullBoothError(f"projection.threshold: with kind={thr.kind} value={thr.value:g} every protected "
                                     "layer has an empty null space, so no update could be learned; raise the threshold")
            run.write_json(MANIFEST, manifest.to_json())  # last: its presence marks the run complete
        except BaseException:
            writer.remove_all()
            raise
    finally:
        dealer.shutdown()
    summary = summarize(manifest, _where(run), reused=False)
    print(format_summary(summary))
    return summary


def _where(run: RunDir) -> str:
    """The run's location to print: absolute for a local path (a relative run_dir inside a submitted Ray job lands
    in the job's working-dir copy, which is worth seeing), the URI otherwise."""
    return run.root if run.is_local and not run.location.startswith("file://") else run.uri()


# -- the existing run ------------------------------------------------------------------------------------------------
def _refusal(run: RunDir, diffs: list[str]) -> str:
    return (f"{run.uri(MANIFEST)}: a complete statistics run made with a different config or model is there; "
            f"pass --force to overwrite it, or choose another run_dir. Differences: " + "; ".join(diffs))


def _check_existing(run: RunDir, config: Config, prompts: tuple[list[str], list[str]], force: bool) -> Manifest | None:
    """A complete run whose config matches (its model fingerprint is checked once the actors are up), or None."""
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
    return None if diffs else manifest


def _check_model(config: Config) -> None:
    """Refuse a model without cross-attention or a layer filter that matches nothing before any actor starts.

    The UNet is built from its config on the meta device (no weights, about a second for SD1.5). If this process
    cannot read the model (a path that exists only on the workers, a hub id not cached here), the actors check it.
    """
    from diffusers import UNet2DConditionModel

    backend = get_backend(config)
    try:
        unet_config = UNet2DConditionModel.load_config(backend.location, subfolder="unet",
                                                       revision=config.model.revision)
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config)
    except (NullBoothError, OSError, ValueError, TypeError):
        return
    backend.check_unet(unet)
    find_protected_layers(unet, config.covariance.layers)


def _clear(run: RunDir) -> None:
    """Remove an old or incomplete run's statistics, the manifest first, so nothing stale looks complete."""
    run.delete(MANIFEST)
    run.delete(COVARIANCE_DIR)
    run.delete(PROJECTION_DIR)


class Writer:
    """Writes the run's tensor files and remembers them, so a failure can remove exactly what it wrote."""

    def __init__(self, run: RunDir):
        self.run = run
        self.written: list[str] = []

    def tensors(self, rel: str, tensors: dict[str, np.ndarray], dtype: torch.dtype) -> None:
        # np.require copies read-only arrays (straight from Ray's object store) that torch cannot wrap.
        self.run.write_tensors(rel, {k: torch.from_numpy(np.require(v, requirements="W")).to(dtype)
                                     for k, v in tensors.items()})
        self.written.append(rel)

    def remove_all(self) -> None:
        """Delete every file written, then the statistics folders if that left them empty."""
        for rel in self.written:
            try:
                self.run.delete(rel)
            except OSError:
                pass
        for folder in (COVARIANCE_DIR, PROJECTION_DIR):
            if not self.run.listdir(folder):
                self.run.delete(folder)


# -- collection, reduction, decomposition ----------------------------------------------------------------------------
def _collect_and_decompose(config: Config, dealer: Dealer, info: dict, writer: Writer, n_prompts: int) -> dict:
    bar = telemetry.progress(n_prompts, "covariance: prompts sampled", unit="prompt")
    try:
        while True:
            dealer.run(on_batch=lambda done: bar.update(done["prompts"]), on_lost=lambda lost: bar.update(-lost))
            try:
                reduced = _reduce(config, dealer, info, writer)
                break
            except (RayActorError, RayTaskError) as err:
                # An actor died after its last batch: its sums are gone, so its batches are dealt again.
                if not dealer.recover(err, on_lost=lambda lost: bar.update(-lost)):
                    raise
    finally:
        bar.close()
    dealer.shutdown()  # the actors' resources (GPUs on a cluster) go to the eigendecomposition tasks
    reduced["spectra"] = reduced.pop("decomposer").collect(writer)
    return reduced


def _reduce(config: Config, dealer: Dealer, info: dict, writer: Writer) -> dict:
    """Tree-reduce "text" then every timestep, writing the mean covariances and queueing their eigendecompositions."""
    plan: list[int] = info["timesteps"]
    image_layers = [name for name, entry in info["layers"].items() if entry["side"] == "image"]
    stored = STORED_DTYPES[config.covariance.dtype]
    thr = config.projection.threshold
    decomposer = Decomposer(config.covariance.eigh_group_size, thr.kind, thr.value, cluster_has_gpu())
    bar = telemetry.progress(len(plan) + 1, "covariance: tree reduction", unit="state")
    done = telemetry.gauge("stats_reduced_states", "states (text + timesteps) tree-reduced")
    try:
        ref, _ = tree_reduce(dealer.states("text"))
        text = ray.get(ref)
        text_cov = text["sums"]["text"] / text["rows"]["text"]
        writer.tensors(covariance_file("text"), {"cov": text_cov}, stored)
        decomposer.add("text", "text", text_cov)
        bar.update(1)
        image_rows: dict[str, dict[str, int]] = {}
        global_sum: dict[str, np.ndarray] = {}
        for i, t in enumerate(plan):
            ref, _ = tree_reduce(dealer.states(t))
            total = ray.get(ref)
            del ref
            missing = [name for name in image_layers if name not in total["rows"]]
            if missing:
                raise NullBoothError(f"covariance.layers: {missing[0]} was never called at timestep {t}; the sampler "
                                     "does not run it, so it has no keys to protect")
            covs = state_means(total)
            writer.tensors(covariance_file(t), covs, stored)
            image_rows[str(t)] = {name: int(total["rows"][name]) for name in image_layers}
            for name in image_layers:
                global_sum[name] = global_sum[name] + covs[name] if name in global_sum else covs[name].copy()
                decomposer.add(t, name, covs[name])
            decomposer.flush()  # one timestep's layers at once, so its groups can be balanced by size
            del total, covs
            bar.update(1)
            done.set(i + 2)
        global_cov = {name: s / len(plan) for name, s in global_sum.items()}
        writer.tensors(covariance_file("global"), global_cov, stored)
        for name in image_layers:
            decomposer.add("global", name, global_cov[name])
        decomposer.flush()
    except BaseException:
        decomposer.cancel()
        raise
    finally:
        bar.close()
    return {"text_rows": int(text["rows"]["text"]), "image_rows": image_rows, "decomposer": decomposer}


class Decomposer:
    """Queues (file, key, covariance) items into eigendecomposition tasks and writes each projection file as soon
    as all its bases are back."""

    def __init__(self, group_size: int, kind: str, value: float, use_gpu: bool):
        self.group_size, self.kind, self.value, self.use_gpu = group_size, kind, value, use_gpu
        self.pending: list[tuple[tuple[Any, str], np.ndarray]] = []
        self.refs: list[ray.ObjectRef] = []
        self.expected: dict[Any, set[str]] = {}
        self.items = 0

    def add(self, file: Any, key: str, cov: np.ndarray) -> None:
        self.expected.setdefault(file, set()).add(key)
        self.pending.append(((file, key), cov))
        self.items += 1

    def flush(self) -> None:
        if self.pending:
            self.refs += submit_groups(self.pending, self.group_size, self.kind, self.value, self.use_gpu)
            self.pending = []

    def cancel(self) -> None:
        for ref in self.refs:
            ray.cancel(ref, force=True)
        self.refs, self.pending = [], []

    def collect(self, writer: Writer) -> dict[Any, dict[str, Spectrum]]:
        """Wait for every task; returns file -> key -> Spectrum with the bases dropped (they are on disk)."""
        bar = telemetry.progress(self.items, "covariance: eigendecompositions", unit="eigh")
        done = telemetry.gauge("stats_eigh_done", "covariances eigendecomposed")
        got: dict[Any, dict[str, Spectrum]] = {}
        kept: dict[Any, dict[str, Spectrum]] = {}
        count = 0
        refs = list(self.refs)
        try:
            while refs:
                [ready], refs = ray.wait(refs, num_returns=1)
                results = ray.get(ready)
                for (file, key), spectrum in results:
                    got.setdefault(file, {})[key] = spectrum
                count += len(results)
                bar.update(len(results))
                done.set(count)
                for file in [f for f, keys in got.items() if set(keys) == self.expected[f]]:
                    _write_projection(writer, file, got[file])
                    kept[file] = {k: Spectrum(np.empty((0, s.null_dim)), s.eigenvalues, s.tau)
                                  for k, s in got.pop(file).items()}
        finally:
            bar.close()
        return kept


def _write_projection(writer: Writer, file: Any, spectra: dict[str, Spectrum]) -> None:
    if file == "text":
        tensors = {"basis": spectra["text"].basis, "eigenvalues": spectra["text"].eigenvalues}
    else:
        tensors = {}
        for key in sorted(spectra):
            tensors[f"{key}.basis"] = spectra[key].basis
            tensors[f"{key}.eigenvalues"] = spectra[key].eigenvalues
    writer.tensors(projection_file(file), tensors, torch.float64)


# -- the manifest ----------------------------------------------------------------------------------------------------
def _spectrum_summary(s: Spectrum) -> dict[str, float]:
    return {"tau": float(s.tau), "eig_min": float(s.eigenvalues.min()), "eig_max": float(s.eigenvalues.max())}


def _manifest(config: Config, info: dict, prompts: list[str], holdout: list[str], result: dict, dealer: Dealer,
              started: float) -> dict[str, Any]:
    spectra = result["spectra"]
    plan = info["timesteps"]
    image_layers = [name for name, entry in info["layers"].items() if entry["side"] == "image"]
    return {
        "format_version": FORMAT_VERSION,
        "backend": config.model.backend,
        "model": {"path": config.model.path, "revision": config.model.revision, "dtype": config.model.dtype,
                  "fingerprint": info["fingerprint"]},
        "scheduler": info["scheduler"],
        "timesteps": plan,
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
                                    for t in plan}},
        "spectra": {"text": _spectrum_summary(spectra["text"]["text"]),
                    "global": {name: _spectrum_summary(spectra["global"][name]) for name in image_layers}},
        "config": result_config(config),
        "collection": {"num_workers": config.covariance.num_workers, "batch_size": config.covariance.batch_size,
                       "batches": len(dealer.batches), "actor_failures": dealer.failures,
                       "seconds": round(time.time() - started, 3), "device": info["device"],
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "nullbooth_version": nullbooth.__version__},
    }
