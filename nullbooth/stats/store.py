"""The statistics' tensor files, read back for every later stage: covariances and null-space bases per layer.

Covariances are stored as means `C = Σ xxᵀ / n` in the manifest's `dtype`; bases and eigenvalues in float64 (file
names in nullbooth.layout, the manifest in stats/manifest.py). Given the manifest, every file is checked against the
digest it records and every tensor against the shape it promises, so a file that changed since it was written, or
does not belong to the manifest, is refused by name.
"""

from __future__ import annotations

import torch

from nullbooth.errors import NullBoothError
from nullbooth.layout import covariance_file, projection_file
from nullbooth.stats.manifest import Manifest, read_listed
from nullbooth.storage import RunDir, tensors_from_bytes

STORED_DTYPES = {"float32": torch.float32, "float64": torch.float64}


# -- tensors ---------------------------------------------------------------------------------------------------------
def read_covariance(run: RunDir, which: str | int, manifest: Manifest | None = None) -> dict[str, torch.Tensor]:
    """The raw tensors of covariance/<which>.safetensors ("cov" for text; layer path -> C otherwise); checked against
    the manifest's digest when it is given."""
    return _read(run, covariance_file(which), manifest)


def read_projection(run: RunDir, which: str | int, manifest: Manifest | None = None) -> dict[str, torch.Tensor]:
    """The raw tensors of projection/<which>.safetensors ("basis"/"eigenvalues", or "<layer>.basis"/...); checked
    against the manifest's digest when it is given."""
    return _read(run, projection_file(which), manifest)


def _read(run: RunDir, rel: str, manifest: Manifest | None) -> dict[str, torch.Tensor]:
    if manifest is None:
        return run.read_tensors(rel)
    return tensors_from_bytes(read_listed(run, manifest, rel), run.uri(rel))


def _check_which(manifest: Manifest, which: str | int) -> None:
    if which != "global" and which not in manifest.timesteps:
        raise NullBoothError(f"timestep {which!r} is not one of the run's collected timesteps {manifest.timesteps} "
                             "(or use 'global')")


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple, where: str) -> torch.Tensor:
    if key not in tensors:
        raise NullBoothError(f"{where}: tensor {key!r} is missing")
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise NullBoothError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the manifest says {shape}")
    return tensor.to(torch.float64)


def load_bases(run: RunDir, manifest: Manifest, which: str | int = "global") -> dict[str, torch.Tensor]:
    """Every protected layer -> its float64 null-space basis U (d, k): text-side layers share the text basis,
    image-side layers get the global or the given timestep's basis."""
    _check_which(manifest, which)
    return _per_layer(run, manifest, which, read_projection, projection_file,
                      text=lambda name, d: ("basis", (d, manifest.null_dim(name))),
                      image=lambda name, d: (f"{name}.basis", (d, manifest.null_dim(name, which))))


def load_layer_covariances(run: RunDir, manifest: Manifest, which: str | int = "global") -> dict[str, torch.Tensor]:
    """Every protected layer -> its float64 covariance C (d, d): text-side layers share the text covariance."""
    _check_which(manifest, which)
    return _per_layer(run, manifest, which, read_covariance, covariance_file,
                      text=lambda name, d: ("cov", (d, d)), image=lambda name, d: (name, (d, d)))


def _per_layer(run: RunDir, manifest: Manifest, which: str | int, read, file_of, text, image) -> dict[str, torch.Tensor]:
    """Layer -> tensor, reading the text file and the `which` file once each; `text(name, d)` / `image(name, d)` give
    the tensor's key and the shape the manifest promises."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    loaded: dict[tuple, torch.Tensor] = {}  # the text tensor is loaded once and shared by every text-side layer
    out: dict[str, torch.Tensor] = {}
    text_layers = set(manifest.text_layers)
    for name in manifest.layers:
        d = manifest.in_features(name)
        source = "text" if name in text_layers else which
        if source not in files:
            files[source] = read(run, source, manifest)
        key, shape = (text if source == "text" else image)(name, d)
        if (source, key) not in loaded:
            loaded[(source, key)] = _tensor(files[source], key, shape, run.uri(file_of(source)))
        out[name] = loaded[(source, key)]
    return out
