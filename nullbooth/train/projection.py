"""The null-space constraint on the LoRA down-projections, in the three projection modes.

A PEFT LoRA adds `ΔW = s·B·A` to a protected linear `W` (`A`: (r, d) down-projection, `B`: (out, r), `s` =
alpha / r). If every row of `A` lies in the null space of the layer's preserved keys (`A = A·U·Uᵀ`, `U` (d, k) the
null-space basis of ../shared/DESIGN.md), then `ΔW·k = s·B·A·U·Uᵀ·k ≈ 0` for every preserved key `k`, whatever `B`.

- `global`: `A` enters the forward pass as `A·U·Uᵀ` through a torch parametrization. The constraint then holds for
  the effective weight by construction, for any optimizer, any initialisation and any number of steps; what is
  exported is that effective weight, so a stock diffusers `load_lora_weights` reproduces the trained model.
- `timestep` (the original NullBooth, kept for comparison): each optimizer step draws all its samples' timesteps
  from one collected-timestep bucket, and the parameter UPDATE of every protected `A` is projected with that
  bucket's basis, `A ← A_old + (A − A_old)·U_t·U_tᵀ`. The initial `A` and the optimizer's moments are not projected.
- `none`: plain LoRA, the baseline.

This module also decides which LoRA targets are protected (have a basis in the statistics run) and refuses the
others unless `projection.allow_unprotected`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.nn.utils import parametrize

from nullbooth.config import Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import MANIFEST
from nullbooth.stats.manifest import Manifest

ADAPTER = "default"  # PEFT's adapter name for `unet.add_adapter(config)`


# ---------------------------------------------------------------------------------------------------------------
# Which targets are protected


@dataclass
class ProjectionPlan:
    """What the training workers need to know about the statistics run."""

    mode: str
    targets: dict[str, int]  # LoRA target layer -> in_features, in module order
    protected: list[str]  # targets with statistics (projected unless mode is none; measured in every mode)
    unprotected: list[str]  # targets without statistics (allowed only with projection.allow_unprotected)
    timesteps: list[int] = field(default_factory=list)  # collected timesteps of the run, in sampling order
    null_dims: dict[str, int] = field(default_factory=dict)  # protected layer -> global (or text) null-space dim
    has_statistics: bool = True
    files: dict[str, str] = field(default_factory=dict)  # statistics file -> sha256, as the driver checked it


def plan_projection(config: Config, manifest: Manifest | None, targets: dict[str, int]) -> ProjectionPlan:
    """Split the LoRA targets into protected / unprotected against a run's manifest, refusing what cannot work.

    `targets`: every UNet linear the LoRA will train -> its in_features. `manifest` is None only in mode `none`
    without a statistics run (then nothing is measured).
    """
    mode = config.projection.mode
    if manifest is None:
        if mode != "none":
            raise NullBoothError(f"projection.mode {mode!r} needs the statistics of {config.run_dir!r}; run "
                                 "`nullbooth build-cov` first (or use projection.mode: none)")
        return ProjectionPlan(mode, dict(targets), [], list(targets), has_statistics=False)
    protected = [name for name in targets if name in manifest.layers]
    unprotected = [name for name in targets if name not in manifest.layers]
    for name in protected:
        if manifest.in_features(name) != targets[name]:
            raise NullBoothError(f"{MANIFEST}: layer {name} has in_features "
                                 f"{manifest.in_features(name)} in the run but {targets[name]} in the model")
    if unprotected and mode != "none" and not config.projection.allow_unprotected:
        shown = ", ".join(unprotected[:3]) + (f" and {len(unprotected) - 3} more" if len(unprotected) > 3 else "")
        raise NullBoothError(f"train.target_modules: {len(unprotected)} LoRA target(s) have no null-space basis in "
                             f"the statistics run ({shown}); add them to covariance.layers and rebuild the "
                             "statistics, or set projection.allow_unprotected: true to train them unconstrained")
    null_dims = {name: manifest.null_dim(name) for name in protected}
    return ProjectionPlan(mode, dict(targets), protected, unprotected, list(manifest.timesteps), null_dims)


# ---------------------------------------------------------------------------------------------------------------
# LoRA modules of a PEFT-adapted UNet


@dataclass
class LoraPair:
    """The two linears of one LoRA layer and its scale `s` (ΔW = s·B·A)."""

    down: torch.nn.Linear  # lora_A: weight (r, d)
    up: torch.nn.Linear  # lora_B: weight (out, r)
    scale: float


def lora_pairs(unet: torch.nn.Module, layers: list[str]) -> dict[str, LoraPair]:
    """Layer path -> its LoRA pair, for every layer in `layers` (which must carry the adapter)."""
    modules = dict(unet.named_modules())
    pairs = {}
    for name in layers:
        layer = modules.get(name)
        if layer is None or not hasattr(layer, "lora_A") or ADAPTER not in layer.lora_A:
            raise RuntimeError(f"{name} carries no LoRA adapter {ADAPTER!r}")  # an invariant of the training code
        pairs[name] = LoraPair(layer.lora_A[ADAPTER], layer.lora_B[ADAPTER], float(layer.scaling[ADAPTER]))
    return pairs


def effective_delta(pair: LoraPair) -> tuple[torch.Tensor, torch.Tensor]:
    """(s·B, A_eff) detached: `ΔW = (s·B)·A_eff`, with A_eff the parametrized (projected) weight in global mode."""
    return (pair.scale * pair.up.weight).detach(), pair.down.weight.detach()


# ---------------------------------------------------------------------------------------------------------------
# global: A -> A·U·Uᵀ inside the forward pass


class NullSpaceProjection(torch.nn.Module):
    """The parametrization `A ↦ A·U·Uᵀ` (rows of A projected onto the null space spanned by U's columns).

    Computed as `(A·U)·Uᵀ`: 2·r·d·k flops, never a dense d×d projector.
    """

    def __init__(self, basis: torch.Tensor):
        super().__init__()
        self.register_buffer("basis", basis)

    def forward(self, down: torch.Tensor) -> torch.Tensor:
        basis = self.basis if self.basis.dtype == down.dtype else self.basis.to(down.dtype)
        return (down @ basis) @ basis.T


def attach_global(pairs: dict[str, LoraPair], bases: dict[str, torch.Tensor]) -> None:
    """Parametrize the down-projection of every layer in `pairs` with its global basis (float32 in the model)."""
    for name, pair in pairs.items():
        basis = bases[name].to(device=pair.down.weight.device, dtype=torch.float32)
        parametrize.register_parametrization(pair.down, "weight", NullSpaceProjection(basis))


# ---------------------------------------------------------------------------------------------------------------
# timestep: one bucket per step, project the update


class TimestepBuckets:
    """Maps every training timestep in [0, num_train_timesteps) to its nearest collected timestep (its bucket).

    Ties go to the smaller collected timestep. Every bucket is a contiguous range of training timesteps; drawing a
    bucket with probability proportional to its width, then a timestep uniformly inside it, keeps the marginal
    distribution of training timesteps uniform, as in plain DreamBooth.
    """

    def __init__(self, collected: list[int], num_train_timesteps: int):
        if not collected:
            raise NullBoothError(f"{MANIFEST}: the run has no collected timesteps")
        self.collected = sorted(collected)
        self.num_train_timesteps = num_train_timesteps
        centers = torch.tensor(self.collected, dtype=torch.float64)
        distance = (torch.arange(num_train_timesteps, dtype=torch.float64)[:, None] - centers[None, :]).abs()
        self.bucket_index = distance.argmin(dim=1)  # argmin returns the first (smaller) center on a tie

    def bucket(self, t: int) -> int:
        """The collected timestep whose basis governs training timestep `t`."""
        if not 0 <= int(t) < self.num_train_timesteps:
            raise ValueError(f"training timestep {t} outside [0, {self.num_train_timesteps})")
        return self.collected[int(self.bucket_index[int(t)])]

    def draw(self, generator: torch.Generator, n: int) -> tuple[int, torch.Tensor]:
        """(bucket, n timesteps inside it): the first timestep picks the bucket, the rest stay inside it."""
        first = int(torch.randint(0, self.num_train_timesteps, (1,), generator=generator))
        index = int(self.bucket_index[first])
        members = torch.nonzero(self.bucket_index == index).flatten()
        picks = members[torch.randint(0, len(members), (n,), generator=generator)]
        return self.collected[index], picks.long()


class TimestepProjector:
    """Projects the optimizer's update of each protected parameter with the step's bucket basis: a LoRA's
    down-projection `A` (r, d) or, with train.adapter full, a layer's `ΔW` (out, d); both act on the layer's input."""

    def __init__(self, params: dict[str, torch.Tensor], bases_by_t: dict[int, dict[str, torch.Tensor]]):
        self.params = params
        # float32 on the parameter's device; bases of text-side layers are shared objects across timesteps.
        self.bases = {t: {name: bases[name].to(device=params[name].device, dtype=torch.float32)
                          for name in params} for t, bases in bases_by_t.items()}
        self.before: dict[str, torch.Tensor] = {}

    def snapshot(self) -> None:
        """Remember every protected parameter before `optimizer.step()`."""
        self.before = {name: param.detach().clone() for name, param in self.params.items()}

    @torch.no_grad()
    def project(self, bucket: int) -> None:
        """P ← P_old + (P − P_old)·U_t·U_tᵀ for the bucket's collected timestep."""
        if bucket not in self.bases:
            raise ValueError(f"no basis for collected timestep {bucket}")
        for name, param in self.params.items():
            old = self.before[name]
            basis = self.bases[bucket][name]
            step = param - old
            param.copy_(old + (step @ basis) @ basis.T)
        self.before = {}
