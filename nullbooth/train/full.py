"""`train.adapter: full`: the protected linears' weights trained directly, in the three projection modes, and the
merged UNet written as a diffusers folder.

Every target linear `W₀` (out, d) gets a torch parametrization whose trained parameter is the update `ΔW` (out, d),
zero at the start, and whose output is the weight the forward pass uses:

- `global`: `W = W₀ + ΔW·U·Uᵀ` (U (d, k): the layer's global null-space basis, see projection.py). The effective
  update `ΔW·U·Uᵀ` has no component on the preserved keys' directions, by construction, for any optimizer and any
  number of steps; `W·k = W₀·k` for every key `k` the null space excludes.
- `timestep`: `W = W₀ + ΔW`, and every optimizer step's update of `ΔW` is projected with the basis of the step's
  timestep bucket (projection.TimestepProjector, as for the LoRA's down-projection).
- `none`: `W = W₀ + ΔW`, plain full fine-tuning of those layers.

Targets without statistics (projection.allow_unprotected) train unconstrained in every mode. Biases stay frozen.
`W₀` is kept as a float32 buffer beside the parameter, so the effective update is read exactly (never as the
difference `W − W₀` of two rounded weights). The parametrization keeps every module path of the UNet, so layer
names, DDP, checkpoints (which hold the raw `ΔW`) and the preservation meter see the same layers as with a LoRA.

Export: the UNet's state dict with each parametrized weight replaced by its effective value `W₀ + ΔW_eff`, all in
float32, plus the UNet's config.json, in `<folder>/unet/`: stock `UNet2DConditionModel.from_pretrained(folder,
subfolder="unet")` loads it and reproduces the trained UNet. On GPU with fp16/bf16 training weights, the frozen
weights are written as the training run held them (rounded to that dtype, then widened to float32).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch.nn.utils import parametrize

from nullbooth.layout import UNET_DIR, UNET_WEIGHTS
from nullbooth.train.projection import (
    ProjectionPlan,
    TimestepBuckets,
    TimestepProjector,
)


class DeltaWeight(torch.nn.Module):
    """The parametrization `ΔW ↦ W₀ + ΔW·U·Uᵀ` (`basis` U given) or `ΔW ↦ W₀ + ΔW` (no basis)."""

    def __init__(self, base: torch.Tensor, basis: torch.Tensor | None):
        super().__init__()
        self.register_buffer("base", base.detach().float().clone())
        self.register_buffer("basis", basis.to(device=base.device, dtype=torch.float32) if basis is not None
                             else None)

    def delta(self, update: torch.Tensor) -> torch.Tensor:
        """The effective update: `ΔW·U·Uᵀ`, computed as `(ΔW·U)·Uᵀ` (never a dense d×d projector), or `ΔW`."""
        return update if self.basis is None else (update @ self.basis) @ self.basis.T

    def forward(self, update: torch.Tensor) -> torch.Tensor:
        return self.base + self.delta(update)

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        """What the parameter starts from when the parametrization is registered: no update."""
        return torch.zeros_like(self.base)


class FullAdapter:
    """The parametrized target linears of one UNet: their trained updates, base weights and effective updates."""

    def __init__(self, unet: torch.nn.Module, targets: list[str], bases: dict[str, torch.Tensor] | None = None):
        """Parametrize every layer in `targets`; those with a basis in `bases` (global mode) are projected."""
        bases = bases or {}
        self.layers: dict[str, torch.nn.Linear] = {}
        for name in targets:
            layer = unet.get_submodule(name)
            if not isinstance(layer, torch.nn.Linear):
                raise RuntimeError(f"{name} is not a linear layer")  # plan_projection only lists linears
            parametrize.register_parametrization(layer, "weight", DeltaWeight(layer.weight, bases.get(name)),
                                                 unsafe=True)  # the parameter is float32 even if W₀ was not
            self.update(layer).requires_grad_(True)
            self.layers[name] = layer

    @staticmethod
    def update(layer: torch.nn.Module) -> torch.nn.Parameter:
        return layer.parametrizations.weight.original

    def updates(self) -> dict[str, torch.nn.Parameter]:
        """Layer -> its trained parameter ΔW (raw: not projected in global mode)."""
        return {name: self.update(layer) for name, layer in self.layers.items()}

    def base_weight(self, name: str) -> torch.Tensor:
        return self.layers[name].parametrizations.weight[0].base

    @torch.no_grad()
    def effective_delta(self, name: str) -> torch.Tensor:
        """ΔW_eff = W − W₀ of one layer, float32, detached, computed from ΔW (not as a difference of weights)."""
        layer = self.layers[name]
        return layer.parametrizations.weight[0].delta(self.update(layer)).detach()

    def meter_deltas(self, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The preservation meter's (up, down) factors of each update: (I, ΔW_eff)."""
        out = {}
        for name in names:
            delta = self.effective_delta(name)
            out[name] = (torch.eye(delta.shape[0], dtype=delta.dtype, device=delta.device), delta)
        return out


def attach_full(unet: torch.nn.Module, plan: ProjectionPlan, loaded: dict, num_train_timesteps: int
                ) -> tuple[FullAdapter, TimestepBuckets | None, TimestepProjector | None]:
    """Parametrize the plan's targets for its mode; `loaded`: the statistics the worker read, keyed
    ("bases", "global" | timestep). Returns the adapter and, in timestep mode, the buckets and the projector of the
    protected layers' ΔW."""
    protected = plan.protected if plan.mode != "none" else []
    bases = {name: loaded[("bases", "global")][name] for name in protected} if plan.mode == "global" else None
    full = FullAdapter(unet, list(plan.targets), bases)
    if plan.mode != "timestep" or not protected:
        return full, None, None
    updates = full.updates()
    projector = TimestepProjector({name: updates[name] for name in protected},
                                  {t: loaded[("bases", t)] for t in plan.timesteps})
    return full, TimestepBuckets(plan.timesteps, num_train_timesteps), projector


def merged_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's state dict as a plain (unparametrized) UNet's, every parametrized weight at its effective value,
    float32 on the CPU."""
    state = {key: value for key, value in unet.state_dict().items() if ".parametrizations." not in key}
    with torch.no_grad():
        for path, module in unet.named_modules():
            if parametrize.is_parametrized(module):
                for name in module.parametrizations:
                    state[f"{path}.{name}" if path else name] = getattr(module, name)
    return {key: value.detach().float().cpu().contiguous().clone() for key, value in state.items()}


def save_unet(unet: torch.nn.Module, directory: str | Path) -> None:
    """Write `<directory>/unet/` (config.json and diffusion_pytorch_model.safetensors) with the merged weights."""
    folder = Path(directory) / UNET_DIR
    folder.mkdir(parents=True, exist_ok=True)
    save_file(merged_state_dict(unet), str(folder / UNET_WEIGHTS), metadata={"format": "pt"})
    unet.save_config(str(folder))
