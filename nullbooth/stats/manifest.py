"""The manifest of a statistics run (covariance/manifest.json) as a typed record, its validation, and its comparison
with a config.

The manifest is written LAST: its presence marks the statistics complete. `Manifest` has one field per JSON key
(see ../shared/DESIGN.md, "On-disk layout") and answers the questions every later stage asks of it: which layers
are text-side and which image-side, and the null-space dimension of a layer at a timestep.

`timesteps` lists the distinct timesteps collected, in order of first use: each has its files and its bases.
`plan` is the sampler's whole plan, repeats included (`dpm++2m-karras` calls the UNet twice at t=1 at 50 steps);
the number of calls at each timestep weights it in the global covariance (stats/moments.py). A manifest without
`plan` (written before plans could repeat) has plan = timesteps. A manifest is checked
strictly when read, so a tampered or truncated one is refused with an error naming the field.

`files` records the sha256 of every covariance and projection file (format 2). Each file is checked against it when
a stage reads it (`read_listed`) and when build-cov would reuse the run, so a file that changed after it was written
is refused by name instead of being used or reported as a complete run.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

from nullbooth.config import THRESHOLD_KINDS, Config
from nullbooth.errors import NullBoothError
from nullbooth.layout import MANIFEST, covariance_file, projection_file
from nullbooth.models.layers import key_side
from nullbooth.prompts import preserved_prompts
from nullbooth.stats.moments import timestep_calls
from nullbooth.storage import RunDir, sha256_hex

FORMAT_VERSION = 2  # 2: `files`, the sha256 of every covariance and projection file
STORED_DTYPES = ("float32", "float64")
_LAYER_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
REBUILD = "rebuild the statistics (nullbooth build-cov --force)"


def expected_files(timesteps: list[int]) -> list[str]:
    """Every covariance and projection file a complete run with this timestep plan holds, in writing order."""
    return [rel for which in ["text", *timesteps, "global"] for rel in (covariance_file(which), projection_file(which))]


def split_layers(layers: dict[str, dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(text-side, image-side) layer names of a layer table (layer -> {"in_features", "side"}), in table order."""
    text = [name for name, entry in layers.items() if entry["side"] == "text"]
    image = [name for name, entry in layers.items() if entry["side"] == "image"]
    return text, image


@dataclass(frozen=True)
class Manifest:
    """What a statistics run measured, as recorded in covariance/manifest.json (field names = JSON keys)."""

    backend: str
    model: dict[str, Any]  # path, revision, dtype, fingerprint
    scheduler: dict[str, Any]  # name, class, config
    timesteps: list[int]  # the distinct timesteps collected, in order of first use
    guidance_scale: float
    uses_guidance: bool
    prompts: list[str]
    holdout_prompts: list[str]
    text_rows: int
    image_rows: dict[str, dict[str, int]]  # "t" -> layer -> n
    layers: dict[str, dict[str, Any]]  # layer -> {"in_features": d, "side": "text" | "image"}
    dtype: str
    threshold: dict[str, Any]  # {"kind", "value"}
    null_dims: dict[str, Any]  # {"text": k, "global": {layer: k}, "timesteps": {"t": {layer: k}}}
    config: dict[str, Any]
    files: dict[str, str]  # run-relative path -> sha256 of the file's bytes
    negative_prompt: str = ""
    product_dtype: str = "float32"
    spectra: dict[str, Any] = field(default_factory=dict)  # {"text": {tau, eig_min, eig_max}, "global": {layer: ...}}
    collection: dict[str, Any] = field(default_factory=dict)
    plan: list[int] | None = None  # the sampler's plan, repeats included; None: the same as `timesteps`
    format_version: int = FORMAT_VERSION

    @property
    def timestep_plan(self) -> list[int]:
        """The sampler's plan in sampling order, a repeated timestep once per UNet call."""
        return list(self.plan) if self.plan is not None else list(self.timesteps)

    @property
    def calls(self) -> dict[int, int]:
        """UNet calls per collected timestep (its weight in the global covariance)."""
        return timestep_calls(self.timestep_plan)

    @property
    def image_layers(self) -> list[str]:
        """The image-side protected layers (to_q, to_out.0: keys are image tokens, one covariance per timestep)."""
        return split_layers(self.layers)[1]

    @property
    def text_layers(self) -> list[str]:
        """The text-side protected layers (to_k, to_v: they all read the one text covariance)."""
        return split_layers(self.layers)[0]

    @property
    def fingerprint(self) -> str:
        return self.model["fingerprint"]

    def in_features(self, layer: str) -> int:
        return int(self.layers[layer]["in_features"])

    def null_dim(self, layer: str, t: int | str = "global") -> int:
        """k of a layer's null-space basis: the text basis for a text-side layer, else the global or timestep-t one."""
        if self.layers[layer]["side"] == "text":
            return int(self.null_dims["text"])
        if t == "global":
            return int(self.null_dims["global"][layer])
        return int(self.null_dims["timesteps"][str(t)][layer])

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: Any, where: str = MANIFEST) -> Manifest:
        """The validated record; a NullBoothError naming the first missing or malformed field."""
        validate_manifest(data, where)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# -- validation ------------------------------------------------------------------------------------------------------
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
    "files": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(d, str) and _SHA256.match(d)
                                                    for k, d in v.items()), "an object file -> sha256 hex digest"),
}


def validate_manifest(manifest: Any, where: str = MANIFEST) -> dict:
    """The manifest if every required field is present and well-formed; else a NullBoothError naming the field."""
    if not isinstance(manifest, dict):
        raise NullBoothError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    version = manifest.get("format_version")
    if version == 1:
        raise NullBoothError(f"{where}: made by an older NullBooth (format_version 1, which records no digests of the "
                             f"files; this one reads {FORMAT_VERSION}); {REBUILD}")
    if version != FORMAT_VERSION:
        raise NullBoothError(f"{where}: format_version is {version!r}, this NullBooth reads {FORMAT_VERSION}; {REBUILD}")
    for name, (check, expected) in _FIELDS.items():
        if name not in manifest:
            raise NullBoothError(f"{where}: required field {name!r} is missing")
        if not check(manifest[name]):
            raise NullBoothError(f"{where}: field {name!r} must be {expected}")
    plan = manifest.get("plan")
    if plan is not None and not (isinstance(plan, list) and all(_is_int(t) for t in plan)
                                 and list(timestep_calls(plan)) == manifest["timesteps"]):
        raise NullBoothError(f"{where}: field 'plan' must be the sampler's plan: a list of integers whose distinct "
                             "values, in order of first use, are 'timesteps'")
    steps = [str(t) for t in manifest["timesteps"]]
    text_layers, image_layers = split_layers(manifest["layers"])
    image_layers = sorted(image_layers)
    if sorted(manifest["image_rows"]) != sorted(steps) or any(
            sorted(manifest["image_rows"][s]) != image_layers for s in steps):
        raise NullBoothError(f"{where}: field 'image_rows' must count every image-side layer at every timestep")
    dims = manifest["null_dims"]
    if sorted(dims["global"]) != image_layers or sorted(dims["timesteps"]) != sorted(steps) or any(
            sorted(dims["timesteps"][s]) != image_layers for s in steps):
        raise NullBoothError(f"{where}: field 'null_dims' must list every image-side layer, globally and per timestep")
    if sorted(manifest["files"]) != sorted(expected_files(manifest["timesteps"])):
        raise NullBoothError(f"{where}: field 'files' must list every covariance and projection file of the run "
                             "(text, each timestep, global)")
    widths = {manifest["layers"][n]["in_features"] for n in text_layers}
    if len(widths) > 1:
        raise NullBoothError(f"{where}: text-side layers must share one width (the text encoder's), got {widths}")
    return manifest


def read_manifest(run: RunDir) -> Manifest:
    """The validated manifest of a complete statistics run (NullBoothError if missing, malformed or tampered)."""
    if not run.exists(MANIFEST):
        raise NullBoothError(f"{run.uri(MANIFEST)} does not exist: {run.uri()} has no complete statistics "
                             "(run `nullbooth build-cov` first)")
    return Manifest.from_json(run.read_json(MANIFEST), run.uri(MANIFEST))


def has_manifest(run: RunDir) -> bool:
    return run.exists(MANIFEST)


def missing_files(run: RunDir, manifest: Manifest) -> list[str]:
    """The covariance and projection files a complete run with this manifest must hold but does not."""
    return [rel for rel in expected_files(manifest.timesteps) if not run.exists(rel)]


def changed_file_error(run: RunDir, rel: str) -> NullBoothError:
    return NullBoothError(f"{run.uri(rel)}: its content does not match the sha256 recorded in {run.uri(MANIFEST)} "
                          f"(the file changed after the statistics were written); {REBUILD}")


def read_listed(run: RunDir, manifest: Manifest, rel: str) -> bytes:
    """The bytes of one of the run's files, checked against the digest its manifest records."""
    data = run.read_bytes(rel)
    if sha256_hex(data) != manifest.files.get(rel):
        raise changed_file_error(run, rel)
    return data


def changed_files(run: RunDir, manifest: Manifest) -> list[str]:
    """The run's files that exist but no longer have the digest the manifest records (reads every file)."""
    return [rel for rel in expected_files(manifest.timesteps)
            if run.exists(rel) and sha256_hex(run.read_bytes(rel)) != manifest.files[rel]]


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


def manifest_mismatches(manifest: Manifest, config: Config, fingerprint: str | None = None, *,
                        timesteps: list[int] | None = None,
                        prompts: tuple[list[str], list[str]] | None = None) -> list[str]:
    """Human-readable differences between a run's manifest and `config` (empty: the run belongs to this config).

    Compares the result-determining config keys, the model fingerprint (when given), the sampler's timestep plan
    and the preserved prompts (both computed from `config` unless passed in).
    """
    found: list[str] = []
    recorded = _flatten(manifest.config)
    for key, value in _flatten(result_config(config)).items():
        if key == "model.backend":
            continue  # compared with the top-level `backend` below
        if key not in recorded:
            found.append(f"{key}: not recorded in the run, config has {value!r}")
        elif recorded[key] != value:
            found.append(f"{key}: run has {recorded[key]!r}, config has {value!r}")
    if manifest.backend != config.model.backend:
        found.append(f"model.backend: run has {manifest.backend!r}, config has {config.model.backend!r}")
    recorded_fp = manifest.fingerprint
    if fingerprint is not None and recorded_fp != fingerprint:
        found.append(f"model fingerprint: run was built on UNet {recorded_fp}, this model is {fingerprint} "
                     "(different weights or architecture)")
    if timesteps is None:
        from nullbooth.models.backends import get_backend

        timesteps = get_backend(config).timestep_plan()
    if manifest.timestep_plan != list(timesteps):
        found.append(f"timesteps: run has {manifest.timestep_plan}, the configured sampler gives {list(timesteps)}")
    kept, held = prompts if prompts is not None else preserved_prompts(config)
    if manifest.prompts != kept:
        found.append(f"prompts: the run measured {len(manifest.prompts)} prompts, the config gives "
                     f"{len(kept)} (or the same number with different text)")
    if manifest.holdout_prompts != held:
        found.append("holdout_prompts: the held-out prompts differ")
    return found


