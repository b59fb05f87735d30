"""What `generate` checks before it samples: the run's statistics and LoRA must belong to this config and model.

    before Ray  the statistics manifest against the config (stats.manifest.manifest_mismatches, as the other stages
                do: backend, model path, sampler and timesteps, prompts, layers, threshold); each LoRA's report.json
                (backend, model path, projection mode); each LoRA weights file: the sha256 its report.json records
                and a well-formed safetensors file of UNet LoRA weights
    the model   one Ray task (the in-process pipeline for --prompt) reads the UNet: its fingerprint must be the one
                the statistics and the LoRA were made on, and every LoRA layer must be a linear of that UNet with
                the LoRA's shapes

Without these checks an LCM config run over an SD/DDIM run sampled happily and wrote a report claiming the LCM model
beside the SD run's preservation numbers; a corrupt LoRA failed inside the sampling actors with a traceback. Every
refusal here is one NullBoothError line naming the file and what differs.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import ray
import torch

from nullbooth.config import Config
from nullbooth.errors import NullBoothError, user_error
from nullbooth.layout import MANIFEST, REPORT_NAME, trained_files
from nullbooth.stats.manifest import has_manifest, manifest_mismatches, read_manifest
from nullbooth.storage import RunDir, sha256_hex, tensors_from_bytes

# diffusers' LoRA keys for the UNet, as `save_lora_weights` writes them (older "lora.down/up" or PEFT "lora_A/B").
_LORA_KEY = re.compile(r"^unet\.(?P<layer>[A-Za-z0-9_.]+)\.(?P<part>lora\.down|lora\.up|lora_A|lora_B)\.weight$")
_DOWN = ("lora.down", "lora_A")


@dataclass
class RunFacts:
    """What the run's files say about the model they were made on, to be checked against the model itself."""

    fingerprints: list[tuple[str, str]] = field(default_factory=list)  # (file, the UNet fingerprint it records)
    loras: dict[str, dict[str, tuple[int, int]]] = field(default_factory=dict)  # weights file -> layer -> (in, out)

    @property
    def layers(self) -> list[str]:
        return sorted({name for layers in self.loras.values() for name in layers})


def check_run(config: Config, run: RunDir, lora_dirs: dict[str, str]) -> RunFacts:
    """Check the statistics (when the run has them) and every LoRA (lora_dirs: folder -> the projection mode it must
    have been trained with) against `config`; returns what remains to be checked against the model."""
    facts = RunFacts()
    if has_manifest(run):
        manifest = read_manifest(run)
        diffs = manifest_mismatches(manifest, config)
        if diffs:
            raise NullBoothError(f"{run.uri(MANIFEST)}: the statistics were made with another model or config than "
                                 "this one; generate with the run's own config, or use another run_dir. "
                                 f"Differences: {'; '.join(diffs)}")
        facts.fingerprints.append((run.uri(MANIFEST), manifest.fingerprint))
    for lora_dir, mode in lora_dirs.items():
        _check_lora(config, run, lora_dir, mode, facts)
    return facts


def _check_lora(config: Config, run: RunDir, lora_dir: str, mode: str, facts: RunFacts) -> None:
    report_rel = f"{lora_dir}/{REPORT_NAME}"
    report = run.read_json(report_rel) if run.exists(report_rel) else {}  # absent: a LoRA made elsewhere
    if not isinstance(report, dict):
        raise NullBoothError(f"{run.uri(report_rel)}: expected a JSON object")
    expected = (("backend", "model.backend", config.model.backend), ("model", "model.path", config.model.path),
                ("mode", "projection.mode", mode), ("adapter", "train.adapter", config.train.adapter))
    diffs = [f"{key}: the LoRA has {report[name]!r}, config has {value!r}"
             for name, key, value in expected if name in report and report[name] != value]
    if diffs:
        raise NullBoothError(f"{run.uri(report_rel)}: the LoRA was trained with another model or config than this "
                             f"one; generate with the run's own config, or train again. Differences: {'; '.join(diffs)}")
    files, signature = report.get("files"), report.get("signature")
    for name in trained_files(config.train.adapter):
        data = run.read_bytes(f"{lora_dir}/{name}")
        recorded = files.get(name) if isinstance(files, dict) else None
        if recorded is not None and sha256_hex(data) != recorded:
            raise NullBoothError(f"{run.uri(f'{lora_dir}/{name}')}: its content does not match the sha256 recorded "
                                 f"in {run.uri(report_rel)} (the file changed after training published it); train "
                                 "again")
    where = run.uri(f"{lora_dir}/{name}")
    facts.loras[where] = (lora_layers(tensors_from_bytes(data, where), where) if config.train.adapter == "lora"
                          else unet_layers(data, report.get("targets") or [], where))
    fingerprint = signature.get("fingerprint") if isinstance(signature, dict) else None
    if isinstance(fingerprint, str):
        facts.fingerprints.append((run.uri(report_rel), fingerprint))


def unet_layers(data: bytes, targets: list[str], where: str) -> dict[str, tuple[int, int]]:
    """Target layer -> (in_features, out_features) of a merged UNet's safetensors file (train.adapter full), read
    from the file's header alone; a NullBoothError when the file is not safetensors or lacks a target's weight."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size])
    except (ValueError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict):
        raise NullBoothError(f"{where}: not a safetensors file (a fully fine-tuned UNet's weights are expected)")
    out = {}
    for name in targets:
        entry = header.get(f"{name}.weight")
        if not isinstance(entry, dict) or len(entry.get("shape", ())) != 2:
            raise NullBoothError(f"{where}: has no 2-D weight for the trained layer {name!r}")
        out[name] = (int(entry["shape"][1]), int(entry["shape"][0]))
    return out


def lora_layers(tensors: dict[str, torch.Tensor], where: str) -> dict[str, tuple[int, int]]:
    """UNet layer -> (in_features, out_features) of a diffusers-format LoRA; a NullBoothError naming the first key
    that is not a UNet LoRA weight or a layer whose two projections do not fit together."""
    down: dict[str, tuple[int, ...]] = {}
    up: dict[str, tuple[int, ...]] = {}
    for key, tensor in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None or tensor.dim() != 2:
            raise NullBoothError(f"{where}: {key!r} is not a UNet LoRA weight in diffusers format "
                                 "(unet.<layer>.lora.down.weight and unet.<layer>.lora.up.weight, 2-D)")
        (down if match["part"] in _DOWN else up)[match["layer"]] = tuple(tensor.shape)
    if not down:
        raise NullBoothError(f"{where}: holds no LoRA weights")
    unpaired = sorted(set(down) ^ set(up))
    if unpaired:
        layer = unpaired[0]
        raise NullBoothError(f"{where}: LoRA layer {layer!r} lacks its {'up' if layer in down else 'down'} "
                             "projection")
    for layer in sorted(down):
        if down[layer][0] != up[layer][1]:
            raise NullBoothError(f"{where}: LoRA layer {layer!r} has rank {down[layer][0]} in its down projection "
                                 f"and {up[layer][1]} in its up projection")
    return {layer: (down[layer][1], up[layer][0]) for layer in sorted(down)}


# -- the model -------------------------------------------------------------------------------------------------------
def model_facts(unet: torch.nn.Module, layers: list[str]) -> dict[str, Any]:
    """The UNet's fingerprint and the (in_features, out_features) of those of `layers` that are linears in it."""
    from nullbooth.models.backends import model_fingerprint

    modules = dict(unet.named_modules())
    linears = {name: (int(modules[name].in_features), int(modules[name].out_features)) for name in layers
               if isinstance(modules.get(name), torch.nn.Linear)}
    return {"fingerprint": model_fingerprint(unet), "linears": linears}


@ray.remote(num_cpus=1)
def _inspect(config: Config, layers: list[str]) -> dict[str, Any]:
    from diffusers import UNet2DConditionModel

    from nullbooth.models.backends import DTYPES, get_backend

    backend = get_backend(config)
    try:
        unet = UNet2DConditionModel.from_pretrained(backend.location, subfolder="unet", revision=config.model.revision,
                                                    torch_dtype=DTYPES[config.model.dtype])
    except (OSError, ValueError) as err:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise NullBoothError(f"model.path: cannot load the UNet of {config.model.path!r}: {reason}") from None
    return model_facts(unet, layers)


def inspect_model(config: Config, layers: list[str]) -> dict[str, Any]:
    """model_facts of the configured UNet, read by one Ray task (the driver loads no weights)."""
    try:
        return ray.get(_inspect.remote(config, layers))
    except ray.exceptions.RayTaskError as err:
        found = user_error(err)
        if found is None:
            raise
        raise found from None


def check_model(config: Config, facts: RunFacts, model: dict[str, Any]) -> None:
    """Refuse statistics or a LoRA made on another UNet, and a LoRA whose layers this UNet does not have."""
    path = config.model.path
    for where, recorded in facts.fingerprints:
        if recorded != model["fingerprint"]:
            raise NullBoothError(f"{where}: made on UNet {recorded}, but the UNet of {path!r} is "
                                 f"{model['fingerprint']} (different weights or architecture); generate with the "
                                 "run's own model, or use another run_dir")
    for where, layers in facts.loras.items():
        for layer, (d_in, d_out) in layers.items():
            have = model["linears"].get(layer)
            if have is None:
                raise NullBoothError(f"{where}: LoRA layer {layer!r} is not a linear layer of the UNet of {path!r} "
                                     "(a LoRA for another model)")
            if tuple(have) != (d_in, d_out):
                raise NullBoothError(f"{where}: LoRA layer {layer!r} maps {d_in}→{d_out} features, the UNet of "
                                     f"{path!r} maps {have[0]}→{have[1]} there (a LoRA for another model)")
