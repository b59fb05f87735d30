"""The statistics part of a run: file names, the manifest, and the readers every later stage uses.

Layout (../shared/DESIGN.md):

    covariance/manifest.json                 written LAST: its presence means the run is complete
    covariance/text.safetensors              "cov" (d_text, d_text)
    covariance/tXXXX.safetensors             one (d, d) tensor per image-side layer, keyed by layer path
    covariance/global.safetensors            mean over timesteps, same keys
    projection/text.safetensors              "basis" (d, k), "eigenvalues" (d,)
    projection/tXXXX.safetensors             "<layer>.basis", "<layer>.eigenvalues"
    projection/global.safetensors

Covariances are stored as means `C = Σ xxᵀ / n` in the manifest's `dtype`; bases and eigenvalues in float64.
`image_rows` counts rows per timestep and layer (`{"751": {layer: n}}`): layers at different UNet resolutions see
different numbers of image tokens. A manifest is checked strictly on reading, so a tampered or truncated one is
refused with an error naming the field, and a run is compared with a config by `manifest_mismatches`.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from nullbooth.config import THRESHOLD_KINDS, Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import MANIFEST, covariance_file, projection_file
from nullbooth.models.layers import key_side
from nullbooth.prompts import read_prompts, resolve_prompts_file
from nullbooth.storage import RunDir

FORMAT_VERSION = 1
STORED_DTYPES = {"float32": torch.float32, "float64": torch.float64}
_LAYER_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


# -- prompts ---------------------------------------------------------------------------------------------------------
def preserved_prompts(config: Config) -> tuple[list[str], list[str]]:
    """(prompts measured, prompts held out): the file's first `max_prompts`, the last `holdout` of them held out."""
    path = resolve_prompts_file(config.preserve.prompts_file)
    prompts = read_prompts(path, config.preserve.max_prompts)
    holdout = config.preserve.holdout
    kept, held = (prompts[:-holdout], prompts[-holdout:]) if holdout else (prompts, [])
    if not kept:
        raise NullBoothError(f"preserve.holdout: holding out {holdout} of the {len(prompts)} prompts of {str(path)!r} "
                             "leaves none for the statistics; lower preserve.holdout or add prompts")
    return kept, held


# -- manifest --------------------------------------------------------------------------------------------------------
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _counts(v: Any, positive: bool = True) -> bool:
    return isinstance(v, dict) and all(isinstance(k, str) and _is_int(n) and n >= (1 if positive else 0)
                                       for k, n in v.items())


_FIELDS = {
    "backend": (lambda v: v in ("sd", "lcm"), "'sd' or 'lcm'"),
    "model": (lambda v: isinstance(v, dict) and isinstance(v.get("path"), str)
              and isinstance(v.get("fingerprint"), str), "an object with string 'path' and 'fingerprint'"),
    "scheduler": (lambda v: isinstance(v, dict) and isinstance(v.get("name"), str) and isinstance(v.get("class"), str)
                  and isinstance(v.get("config"), dict), "an object with 'name', 'class' and 'config'"),
    "timesteps": (lambda v: isinstance(v, list) and bool(v) and all(_is_int(t) and 0 <= t <= 9999 for t in v)
                  and len(set(v)) == len(v), "a non-empty list of distinct integers 0..9999"),
    "guidance_scale": (_is_number, "a number"),
    "uses_guidance": (lambda v: isinstance(v, bool), "true or false"),
    "prompts": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(p, str) for p in v),
                "a non-empty list of strings"),
    "holdout_prompts": (lambda v: isinstance(v, list) and all(isinstance(p, str) for p in v), "a list of strings"),
    "text_rows": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "image_rows": (lambda v: isinstance(v, dict) and all(_counts(c) for c in v.values()),
                   "an object timestep -> {layer: positive integer}"),
    "layers": (lambda v: isinstance(v, dict) and bool(v) and all(
        isinstance(name, str) and _LAYER_NAME.match(name) and isinstance(e, dict) and _is_int(e.get("in_features"))
        and e["in_features"] > 0 and e.get("side") == key_side(name) for name, e in v.items()),
        "a non-empty object layer -> {in_features: d, side: text|image}"),
    "dtype": (lambda v: v in STORED_DTYPES, "'float32' or 'float64'"),
    "threshold": (lambda v: isinstance(v, dict) and v.get("kind") in THRESHOLD_KINDS and _is_number(v.get("value")),
                  f"an object with 'kind' ({', '.join(THRESHOLD_KINDS)}) and a number 'value'"),
    "null_dims": (lambda v: isinstance(v, dict) and _is_int(v.get("text")) and v["text"] >= 0
                  and _counts(v.get("global"), positive=False) and isinstance(v.get("timesteps"), dict)
                  and all(_counts(c, positive=False) for c in v["timesteps"].values()),
                  "an object with 'text', 'global' and 'timesteps' null-space dimensions"),
    "config": (lambda v: isinstance(v, dict), "an object"),
}


def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict:
    """The manifest if every required field is present and well-formed; else a NullBoothError naming the field."""
    if not isinstance(manifest, dict):
        raise NullBoothError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise NullBoothError(f"{where}: format_version is {manifest.get('format_version')!r}, this NullBooth reads "
                             f"{FORMAT_VERSION}; rebuild the statistics (nullbooth build-cov --force)")
    for name, (check, expected) in _FIELDS.items():
        if name not in manifest:
            raise NullBoothError(f"{where}: required field {name!r} is missing")
        if not check(manifest[name]):
            raise NullBoothError(f"{where}: field {name!r} must be {expected}")
    steps = [str(t) for t in manifest["timesteps"]]
    image_layers = sorted(n for n, e in manifest["layers"].items() if e["side"] == "image")
    text_layers = [n for n, e in manifest["layers"].items() if e["side"] == "text"]
    if sorted(manifest["image_rows"]) != sorted(steps) or any(
            sorted(manifest["image_rows"][s]) != image_layers for s in steps):
        raise NullBoothError(f"{where}: field 'image_rows' must count every image-side layer at every timestep")
    dims = manifest["null_dims"]
    if sorted(dims["global"]) != image_layers or sorted(dims["timesteps"]) != sorted(steps) or any(
            sorted(dims["timesteps"][s]) != image_layers for s in steps):
        raise NullBoothError(f"{where}: field 'null_dims' must list every image-side layer, globally and per timestep")
    widths = {manifest["layers"][n]["in_features"] for n in text_layers}
    if len(widths) > 1:
        raise NullBoothError(f"{where}: text-side layers must share one width (the text encoder's), got {widths}")
    return manifest


def read_manifest(run: RunDir) -> dict:
    """The validated manifest of a complete statistics run (NullBoothError if missing, malformed or tampered)."""
    if not run.exists(MANIFEST):
        raise NullBoothError(f"{run.uri(MANIFEST)} does not exist: {run.uri()} has no complete statistics "
                             "(run `nullbooth build-cov` first)")
    return validate_manifest(run.read_json(MANIFEST), run.uri(MANIFEST))


def has_manifest(run: RunDir) -> bool:
    return run.exists(MANIFEST)


def missing_files(run: RunDir, manifest: dict) -> list[str]:
    """The covariance and projection files a complete run with this manifest must hold but does not."""
    stems = ["text", "global", *manifest["timesteps"]]
    return [rel for which in stems for rel in (covariance_file(which), projection_file(which)) if not run.exists(rel)]


# -- comparing a run with a config -----------------------------------------------------------------------------------
def result_config(config: Config) -> dict:
    """The config sections that determine a statistics run's result, as recorded in its manifest."""
    d = config.to_dict()
    return {"model": {k: d["model"][k] for k in ("backend", "path", "revision", "dtype")},
            "sampling": d["sampling"], "preserve": d["preserve"],
            "covariance": {"layers": d["covariance"]["layers"]},
            "projection": {"threshold": d["projection"]["threshold"]}}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def manifest_mismatches(manifest: dict, config: Config, fingerprint: str | None = None, *,
                        timesteps: list[int] | None = None,
                        prompts: tuple[list[str], list[str]] | None = None) -> list[str]:
    """Human-readable differences between a run's manifest and `config` (empty: the run belongs to this config).

    Compares the result-determining config keys, the model fingerprint (when given), the sampler's timestep plan
    and the preserved prompts (both computed from `config` unless passed in).
    """
    found: list[str] = []
    recorded = _flatten(manifest.get("config", {}))
    for key, value in _flatten(result_config(config)).items():
        if key == "model.backend":
            continue  # compared with the top-level `backend` below
        if key not in recorded:
            found.append(f"{key}: not recorded in the run, config has {value!r}")
        elif recorded[key] != value:
            found.append(f"{key}: run has {recorded[key]!r}, config has {value!r}")
    if manifest.get("backend") != config.model.backend:
        found.append(f"model.backend: run has {manifest.get('backend')!r}, config has {config.model.backend!r}")
    recorded_fp = manifest.get("model", {}).get("fingerprint")
    if fingerprint is not None and recorded_fp != fingerprint:
        found.append(f"model fingerprint: run was built on UNet {recorded_fp}, this model is {fingerprint} "
                     "(different weights or architecture)")
    if timesteps is None:
        from nullbooth.models.backends import get_backend

        timesteps = get_backend(config).timestep_plan()
    if manifest.get("timesteps") != list(timesteps):
        found.append(f"timesteps: run has {manifest.get('timesteps')}, the configured sampler gives {list(timesteps)}")
    kept, held = prompts if prompts is not None else preserved_prompts(config)
    if manifest.get("prompts") != kept:
        found.append(f"prompts: the run measured {len(manifest.get('prompts', []))} prompts, the config gives "
                     f"{len(kept)} (or the same number with different text)")
    if manifest.get("holdout_prompts") != held:
        found.append("holdout_prompts: the held-out prompts differ")
    return found


# -- tensors ---------------------------------------------------------------------------------------------------------
def read_covariance(run: RunDir, which: str | int) -> dict[str, torch.Tensor]:
    """The raw tensors of covariance/<which>.safetensors ("cov" for text; layer path -> C otherwise)."""
    return run.read_tensors(covariance_file(which))


def read_projection(run: RunDir, which: str | int) -> dict[str, torch.Tensor]:
    """The raw tensors of projection/<which>.safetensors ("basis"/"eigenvalues", or "<layer>.basis"/...)."""
    return run.read_tensors(projection_file(which))


def _check_which(manifest: dict, which: str | int) -> None:
    if which != "global" and which not in manifest["timesteps"]:
        raise NullBoothError(f"timestep {which!r} is not one of the run's collected timesteps {manifest['timesteps']} "
                             "(or use 'global')")


def _tensor(tensors: dict[str, torch.Tensor], key: str, shape: tuple, where: str) -> torch.Tensor:
    if key not in tensors:
        raise NullBoothError(f"{where}: tensor {key!r} is missing")
    tensor = tensors[key]
    if tuple(tensor.shape) != shape:
        raise NullBoothError(f"{where}: tensor {key!r} has shape {tuple(tensor.shape)}, the manifest says {shape}")
    return tensor.to(torch.float64)


def load_bases(run: RunDir, manifest: dict, which: str | int = "global") -> dict[str, torch.Tensor]:
    """Every protected layer -> its float64 null-space basis U (d, k): text-side layers share the text basis,
    image-side layers get the global or the given timestep's basis."""
    _check_which(manifest, which)
    dims = manifest["null_dims"]
    image_dims = dims["global"] if which == "global" else dims["timesteps"][str(which)]
    return _per_layer(run, manifest, which, read_projection, projection_file,
                      text=lambda d: ("basis", (d, dims["text"])),
                      image=lambda name, d: (f"{name}.basis", (d, image_dims[name])))


def load_layer_covariances(run: RunDir, manifest: dict, which: str | int = "global") -> dict[str, torch.Tensor]:
    """Every protected layer -> its float64 covariance C (d, d): text-side layers share the text covariance."""
    _check_which(manifest, which)
    return _per_layer(run, manifest, which, read_covariance, covariance_file,
                      text=lambda d: ("cov", (d, d)), image=lambda name, d: (name, (d, d)))


def _per_layer(run: RunDir, manifest: dict, which: str | int, read, file_of, text, image) -> dict[str, torch.Tensor]:
    """Layer -> tensor, reading the text file and the `which` file once each; `text(d)` / `image(name, d)` give
    the tensor's key and the shape the manifest promises."""
    files: dict[str, dict[str, torch.Tensor]] = {}
    loaded: dict[tuple, torch.Tensor] = {}  # the text tensor is loaded once and shared by every text-side layer
    out: dict[str, torch.Tensor] = {}
    for name, entry in manifest["layers"].items():
        d = entry["in_features"]
        source = "text" if entry["side"] == "text" else which
        if source not in files:
            files[source] = read(run, source)
        key, shape = text(d) if source == "text" else image(name, d)
        if (source, key) not in loaded:
            loaded[(source, key)] = _tensor(files[source], key, shape, run.uri(file_of(source)))
        out[name] = loaded[(source, key)]
    return out
