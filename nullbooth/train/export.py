"""The trained LoRA in diffusers format, and its publication to `run_dir/lora/`.

What is written is the EFFECTIVE adapter: in global mode the down-projection `A·U·Uᵀ` (the parametrization's output),
not the raw parameter. The state dict has exactly the keys PEFT's `get_peft_model_state_dict` gives for a plain
LoRA, converted with diffusers' `convert_state_dict_to_diffusers` and saved by the pipeline class's own
`save_lora_weights` with the adapter metadata (rank, alpha), so stock `pipe.load_lora_weights(run_dir + "/lora")`
followed by `fuse_lora()` reproduces the trained UNet.

With train.adapter full, the checkpoint's lora/ holds instead the merged UNet as a diffusers folder, `unet/`
(full.save_unet), which `publish` copies the same way.

Rank 0 writes this into every checkpoint; the driver copies the final checkpoint's files to `run_dir/lora/`
(atomically, weights first, `report.json` last, with the weights' sha256 added).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from nullbooth.errors import NullBoothError
from nullbooth.layout import LORA_DIR, trained_files
from nullbooth.layout import LORA_WEIGHTS as WEIGHTS
from nullbooth.layout import REPORT_NAME as REPORT
from nullbooth.storage import RunDir, sha256_hex
from nullbooth.train.projection import LoraPair


def peft_state_dict(pairs: dict[str, LoraPair]) -> dict[str, torch.Tensor]:
    """PEFT-format keys ("<layer>.lora_A.weight", "<layer>.lora_B.weight") with the effective, detached weights."""
    out = {}
    for name, pair in pairs.items():
        out[f"{name}.lora_A.weight"] = pair.down.weight.detach().float().cpu().contiguous()
        out[f"{name}.lora_B.weight"] = pair.up.weight.detach().float().cpu().contiguous()
    return out


def save_lora(pipeline_class: type, directory: str | Path, pairs: dict[str, LoraPair],
              lora_config: dict[str, Any]) -> None:
    """Write `pytorch_lora_weights.safetensors` into `directory` with diffusers' own writer."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = convert_state_dict_to_diffusers(peft_state_dict(pairs))
    pipeline_class.save_lora_weights(str(directory), unet_lora_layers=layers, weight_name=WEIGHTS,
                                     safe_serialization=True, unet_lora_adapter_metadata=lora_config)


def publish(run: RunDir, checkpoint_dir: str | Path, lora_dir: str = LORA_DIR, adapter: str = "lora") -> str:
    """Copy a checkpoint's trained weights (the LoRA file, or with train.adapter full the merged UNet folder,
    layout.trained_files) and report into `run_dir/<lora_dir>/` (default lora/); returns its location.

    The published report.json records the sha256 of the weights ("files"), which `generate` checks before it loads
    them."""
    source = Path(checkpoint_dir)
    files = {rel: (source / LORA_DIR / rel).read_bytes() for rel in trained_files(adapter)}
    try:
        report = json.loads((source / REPORT).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise NullBoothError(f"{source / REPORT} is not valid JSON ({err})") from None
    if not isinstance(report, dict):
        raise NullBoothError(f"{source / REPORT}: expected a JSON object")
    for rel in trained_files("full" if adapter == "lora" else "lora"):  # what a run of the other adapter left
        if run.exists(f"{lora_dir}/{rel}"):
            run.delete(f"{lora_dir}/{rel}")
    for rel, data in files.items():
        run.write_bytes(f"{lora_dir}/{rel}", data)
    digests = {rel: sha256_hex(data) for rel, data in files.items()}
    run.write_json(f"{lora_dir}/{REPORT}", {**report, "files": digests})  # last: marks it done
    return run.uri(lora_dir)


def local_checkpoint_copy(checkpoint) -> tuple[str, Any]:
    """(local folder, cleanup) for a ray.train.Checkpoint, on local disk or in cloud storage."""
    if checkpoint.filesystem is not None and type(checkpoint.filesystem).__name__ == "LocalFileSystem":
        return checkpoint.path, lambda: None
    temp = tempfile.TemporaryDirectory(prefix="nullbooth-ckpt-")
    return checkpoint.to_directory(temp.name), temp.cleanup
