"""Preservation error of the LoRA update, from the stored covariances (../shared/DESIGN.md).

Per layer `err = sqrt(tr(ΔW C ΔWᵀ) / tr(W C Wᵀ))`, the RMS relative change of the layer's output on preserved
keys, with `C` the global covariance or one collected timestep's (text-side layers use the single text covariance at
every timestep). This is `nullbooth.nullspace.preservation_error`, evaluated through the LoRA's low rank:
`ΔW = (s·B)·A`, so `tr(ΔW C ΔWᵀ) = tr((s·B)ᵀ(s·B) · A C Aᵀ)`, which costs r·d² instead of out·d² per layer, and the
denominators are computed once. `overall` is the root mean square of the per-layer errors (each protected layer
counts once, whatever its width); `max` is the largest.
"""

from __future__ import annotations

import math

import torch

OVERALL_DEFINITION = "root mean square over protected layers of sqrt(tr(dW C dW^T) / tr(W C W^T))"


class PreservationMeter:
    """Holds the covariances and base weights of the protected layers; measures any LoRA delta against them."""

    def __init__(self, base_weights: dict[str, torch.Tensor], global_covs: dict[str, torch.Tensor],
                 covs_by_t: dict[int, dict[str, torch.Tensor]]):
        self.layers = list(base_weights)
        self.covs = {"global": {n: global_covs[n].to(torch.float64) for n in self.layers}}
        for t, covs in covs_by_t.items():
            self.covs[t] = {n: covs[n].to(torch.float64) for n in self.layers}
        self.base = {which: {n: _quadratic(base_weights[n].detach().to(torch.float64).cpu(), c)
                             for n, c in covs.items()} for which, covs in self.covs.items()}

    def layer_errors(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]], which: str | int = "global"
                     ) -> dict[str, float]:
        """Layer -> error, for `deltas`: layer -> (s·B (out, r), A_eff (r, d))."""
        out = {}
        for name in self.layers:
            up, down = (t.detach().to(torch.float64).cpu() for t in deltas[name])
            gram = up.T @ up  # (r, r)
            moved = float(torch.sum(gram * (down @ self.covs[which][name] @ down.T)))
            base = self.base[which][name]
            out[name] = math.sqrt(max(moved, 0.0) / base) if base > 0 else float("nan")
        return out

    def report(self, deltas: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
        """Per layer (global covariance), overall, max, and the same per collected timestep."""
        per_layer = self.layer_errors(deltas, "global")
        per_timestep = {}
        for which in self.covs:
            if which == "global":
                continue
            errors = self.layer_errors(deltas, which)
            per_timestep[str(which)] = {"overall": _rms(errors.values()), "max": max(errors.values(), default=0.0),
                                        "per_layer": errors}
        return {"overall": _rms(per_layer.values()), "max": max(per_layer.values(), default=0.0),
                "per_layer": per_layer, "per_timestep": per_timestep, "overall_definition": OVERALL_DEFINITION}


def _quadratic(weight: torch.Tensor, cov: torch.Tensor) -> float:
    """tr(W C Wᵀ) in float64."""
    return float(torch.einsum("ij,jk,ik->", weight, cov, weight))


def _rms(values) -> float:
    values = list(values)
    return math.sqrt(sum(v * v for v in values) / len(values)) if values else 0.0
