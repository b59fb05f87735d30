"""Queueing the reduced covariances into eigendecomposition tasks (stats/spectrum.py) and writing each projection
file as soon as all its bases are back."""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from nullbooth import telemetry
from nullbooth.layout import projection_file
from nullbooth.stats.spectrum import Spectrum, submit_groups
from nullbooth.stats.writer import Writer


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
