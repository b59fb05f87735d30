"""Test helpers that build parts of a run_dir the way the other stages would.

- `make_lora`: a diffusers-format LoRA for the tiny UNet, made with PEFT as a user's training would. `b_std=0` gives
  a zeroed LoRA (lora_B = 0), which must leave every output bit-identical; `b_std>0` a random nonzero one.
- `write_fake_statistics`: a complete statistics run (manifest, covariance and projection files) in the statistics
  stage's layout, from synthetic covariances whose null spaces are computed with nullbooth.nullspace.
- `write_train_report`: lora/report.json in the training stage's layout.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

from nullbooth.config import DEFAULT_PROTECTED_LAYERS
from nullbooth.layout import MANIFEST, covariance_file, projection_file
from nullbooth.models.layers import find_protected_layers, layer_table
from nullbooth.models.registry import resolve_model_location
from nullbooth.nullspace import null_space
from nullbooth.stats.manifest import (
    FORMAT_VERSION,
    Manifest,
    expected_files,
    split_layers,
)
from nullbooth.storage import RunDir, sha256_hex

TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


@functools.lru_cache(maxsize=2)
def _base_unet(model_path: str) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(resolve_model_location(model_path), subfolder="unet")


def _unet(model_path: str) -> UNet2DConditionModel:
    """A fresh copy of the model's UNet (callers add adapters to it), loaded from disk once per process."""
    return copy.deepcopy(_base_unet(model_path))


def make_lora(model_path: str, out_dir: str | Path, b_std: float, rank: int = 4, seed: int = 0) -> Path:
    """Save a LoRA on the cross-attention linears of `model_path`'s UNet into `out_dir`; returns `out_dir`."""
    unet = _unet(model_path)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS, init_lora_weights=True))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * b_std)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(str(out_dir), unet_lora_layers=layers)
    return Path(out_dir)


def _covariance(d: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(4 * d, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, d, generator=gen,
                                                                                   dtype=torch.float64)
    return x.T @ x / x.shape[0] + 1e-9 * torch.eye(d, dtype=torch.float64)


def random_low_rank(seed: int = 7):
    """The default covariances: random, of a rank that varies by layer and timestep (so null spaces differ)."""
    gen = torch.Generator().manual_seed(seed)

    def covariance(which: str | int, index: int, d: int) -> torch.Tensor:
        if which == "text":
            return _covariance(d, d // 2, gen)
        return _covariance(d, max(1, d - (index % 5) * d // 8 - (0 if which == "global" else int(which) % 3)), gen)

    return covariance


def write_fake_statistics(run_dir: str | Path, holdout: list[str] = (), timesteps: list[int] = (801, 401, 1),
                          model_path: str = "tiny", kind: str = "relative", value: float = 1e-3,
                          covariance=None) -> Manifest:
    """A complete statistics run for `model_path`'s UNet in the stage's layout, from synthetic covariances; returns
    the manifest (validated by the stage's own checker). `covariance(which, layer_index, d)` gives each (d, d)
    covariance, `which` being "text", a timestep or "global" (default: random_low_rank()). Bases, eigenvalues and
    null-space dimensions are computed from them by nullbooth.nullspace.null_space, so they are consistent."""
    covariance = covariance or random_low_rank()
    run = RunDir(str(run_dir))
    table = layer_table(find_protected_layers(_unet(model_path), DEFAULT_PROTECTED_LAYERS))
    text_layers, image_layers = split_layers(table)
    null_dims: dict = {"global": {}, "timesteps": {}}
    spectra: dict = {"global": {}}
    text_cov = covariance("text", 0, table[text_layers[0]]["in_features"])
    basis, eig, tau = null_space(text_cov, kind, value)
    run.write_tensors(covariance_file("text"), {"cov": text_cov})
    run.write_tensors(projection_file("text"), {"basis": basis, "eigenvalues": eig})
    null_dims["text"], spectra["text"] = basis.shape[1], {"tau": tau, "eig_min": float(eig.min()),
                                                          "eig_max": float(eig.max())}
    for which in [*timesteps, "global"]:
        covs, tensors, dims = {}, {}, {}
        for i, name in enumerate(image_layers):
            covs[name] = covariance(which, i, table[name]["in_features"])
            basis, eig, tau = null_space(covs[name], kind, value)
            tensors[f"{name}.basis"], tensors[f"{name}.eigenvalues"], dims[name] = basis, eig, basis.shape[1]
            if which == "global":
                spectra["global"][name] = {"tau": tau, "eig_min": float(eig.min()), "eig_max": float(eig.max())}
        run.write_tensors(covariance_file(which), covs)
        run.write_tensors(projection_file(which), tensors)
        if which == "global":
            null_dims["global"] = dims
        else:
            null_dims["timesteps"][str(which)] = dims
    manifest = Manifest.from_json({
        "format_version": FORMAT_VERSION, "backend": "sd",
        "model": {"path": model_path, "revision": None, "dtype": "float32", "fingerprint": "fake"},
        "scheduler": {"name": "ddim", "class": "DDIMScheduler", "config": {}}, "timesteps": list(timesteps),
        "guidance_scale": 7.5, "uses_guidance": True, "prompts": ["a measured prompt"],
        "holdout_prompts": list(holdout), "text_rows": 64,
        "image_rows": {str(t): {n: 256 for n in image_layers} for t in timesteps},
        "layers": table, "dtype": "float64", "threshold": {"kind": kind, "value": value}, "null_dims": null_dims,
        "spectra": spectra, "config": {},
        "files": {rel: sha256_hex(run.read_bytes(rel)) for rel in expected_files(list(timesteps))}})
    run.write_json(MANIFEST, manifest.to_json())
    return manifest


def write_train_report(run_dir: str | Path, mode: str, scale: float, timesteps: list[int] = (801, 401, 1),
                       model_path: str = "tiny") -> dict:
    """lora/report.json in the training stage's layout (errors under "preservation", per_timestep entries as
    objects); returns it."""
    layers = list(find_protected_layers(_unet(model_path), DEFAULT_PROTECTED_LAYERS))
    per_layer = {n: scale * (1 + i % 4) / 4 for i, n in enumerate(layers)}
    errors = {"overall": scale * 0.7, "max": scale, "per_layer": per_layer,
              "per_timestep": {str(t): {"overall": scale * (0.5 + i / 4), "max": scale, "per_layer": per_layer}
                               for i, t in enumerate(timesteps)}, "overall_definition": "rms"}
    report = {"step": 10, "mode": mode, "unprotected": [], "final_loss": 0.1, "preservation": errors}
    RunDir(str(run_dir)).write_json("lora/report.json", report)
    return report


def worker_for(config, images):
    """(a training Worker over the run's statistics on one thread, the run's manifest): the unit tests' worker."""
    from nullbooth.stats.manifest import read_manifest
    from nullbooth.storage import RunDir
    from nullbooth.train.projection import plan_projection
    from nullbooth.train.worker import Worker

    manifest = read_manifest(RunDir(config.run_dir))
    plan = plan_projection(config, manifest, {n: e["in_features"] for n, e in manifest.layers.items()})
    torch.set_num_threads(1)
    return Worker(config, plan, images, None), manifest


def train_steps(worker, n):
    for _ in range(n):
        worker.train_step()

