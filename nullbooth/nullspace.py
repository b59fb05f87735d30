"""The math every stage shares: null-space bases from a covariance, and the preservation error of an update.

Definitions (../shared/DESIGN.md):
- `eigh(C) = V Λ Vᵀ` in float64; the null-space basis `U` is the eigenvectors with eigenvalue ≤ τ (so `UᵀU = I`).
- τ by threshold kind: `relative` τ = value·λmax; `absolute` τ = value; `energy` the null space holds at most
  `value` of the trace (the smallest eigenvalues whose sum is ≤ value·tr C); `percentile` τ = the value-th
  percentile of the eigenvalues (compatibility with the original NullBooth).
- preservation error of a layer: `sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`, the RMS relative change of its output on
  preserved keys.
"""

from __future__ import annotations

import torch

from nullbooth.errors import NullBoothError


def threshold_tau(eigenvalues: torch.Tensor, kind: str, value: float) -> float:
    """τ for ascending `eigenvalues` of one covariance."""
    lam = eigenvalues.to(torch.float64)
    if kind == "relative":
        return float(value * lam.max().clamp(min=0.0))
    if kind == "absolute":
        return float(value)
    if kind == "energy":
        # Ascending, so the cumulative sum grows from the smallest eigenvalue; keep those within the energy budget.
        budget = value * float(lam.clamp(min=0.0).sum())
        within = torch.cumsum(lam.clamp(min=0.0), 0) <= budget
        return float(lam[within].max()) if bool(within.any()) else float("-inf")
    if kind == "percentile":
        if not 0.0 <= value <= 100.0:
            raise NullBoothError(f"projection.threshold.value: a percentile must lie in [0, 100], got {value}")
        return float(torch.quantile(lam, value / 100.0))
    raise NullBoothError(f"projection.threshold.kind: unknown kind {kind!r}")


def null_space(cov: torch.Tensor, kind: str, value: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(basis U (d, k), all eigenvalues ascending (d,), τ) of a symmetric covariance, in float64."""
    cov64 = cov.to(torch.float64)
    cov64 = (cov64 + cov64.T) / 2  # summation order leaves tiny asymmetries; eigh assumes exact symmetry
    eigenvalues, eigenvectors = torch.linalg.eigh(cov64)
    tau = threshold_tau(eigenvalues, kind, value)
    keep = eigenvalues <= tau
    return eigenvectors[:, keep].contiguous(), eigenvalues, tau


def preservation_error(delta_w: torch.Tensor, cov: torch.Tensor, weight: torch.Tensor) -> float:
    """sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ)) in float64."""
    dw, c, w = (t.detach().to(torch.float64).cpu() for t in (delta_w, cov, weight))
    moved = torch.einsum("ij,jk,ik->", dw, c, dw)
    base = torch.einsum("ij,jk,ik->", w, c, w)
    return float(torch.sqrt(moved.clamp(min=0.0) / base)) if float(base) > 0 else float("nan")
