"""Eigendecomposition of the reduced covariances in Ray remote tasks: the null-space bases.

Each task takes a group of (key, covariance) items — layers and timesteps mixed, `covariance.eigh_group_size` per
task — and returns, per item, the float64 basis `U` (eigenvalues ≤ τ), all eigenvalues and τ
(`nullbooth.nullspace.null_space`). Tasks ask for a GPU when the cluster has one (float64 `eigh` of a 1280×1280
matrix is milliseconds there); otherwise one CPU each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import torch

from nullbooth.nullspace import null_space


@dataclass
class Spectrum:
    """One covariance's eigendecomposition, reduced to what the run keeps."""

    basis: np.ndarray  # (d, k) float64, orthonormal columns
    eigenvalues: np.ndarray  # (d,) float64, ascending
    tau: float

    @property
    def null_dim(self) -> int:
        return int(self.basis.shape[1])


def decompose(items: list[tuple[Any, np.ndarray]], kind: str, value: float) -> list[tuple[Any, Spectrum]]:
    """Null-space bases of a group of covariances, on the GPU when this process has one."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = []
    for key, cov in items:
        basis, eigenvalues, tau = null_space(torch.from_numpy(np.require(cov, requirements="W")).to(device), kind, value)
        out.append((key, Spectrum(basis.cpu().numpy(), eigenvalues.cpu().numpy(), tau)))
    return out


@ray.remote
def _decompose_task(items, kind, value):
    return decompose(items, kind, value)


def submit_groups(items: list[tuple[Any, np.ndarray]], group_size: int, kind: str, value: float,
                  use_gpu: bool) -> list[ray.ObjectRef]:
    """One remote task per `group_size` items; each returns `decompose`'s list.

    eigh costs O(d³), so groups taken in module order would give one task all the 1280-wide SD1.5 layers and
    another all the 320-wide ones. Dealing the items round-robin by size instead gives every task a similar load.
    """
    options = {"num_gpus": 1, "num_cpus": 1} if use_gpu else {"num_cpus": 1}
    n_groups = -(-len(items) // group_size)
    groups: list[list[tuple[Any, np.ndarray]]] = [[] for _ in range(n_groups)]
    for rank, item in enumerate(sorted(items, key=lambda item: -item[1].shape[0])):
        groups[rank % n_groups].append(item)
    return [_decompose_task.options(**options).remote(group, kind, value) for group in groups]
