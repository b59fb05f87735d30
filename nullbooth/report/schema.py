"""The layout of report.json (REPORT_SCHEMA), its validation, and the reader every consumer of a report uses."""

from __future__ import annotations

import math
from typing import Any

from nullbooth.errors import NullBoothError
from nullbooth.layout import REPORT_JSON
from nullbooth.storage import RunDir

FORMAT_VERSION = 3  # 2: class prompts, the plain-LoRA baseline's samples, the toy-world probe's scores; 3: adapter
# Version 2 reports read as 3 with adapter "lora": that was the only adapter then.
ADAPTERS_BEFORE_VERSION_3 = "lora"

# -- the schema of report.json -----------------------------------------------------------------------------------
# A spec is "int", "number", "nonneg" (number ≥ 0), "str", a dict {key: spec} (exactly these keys), or a tuple
# ("list", spec), ("map", spec) (str keys), ("nullable", spec), ("enum", value, ...).
_DRIFT_MEAN = {"prompts": "int", "latent_mse": "nonneg", "pixel_mse": "nonneg", "pixel_psnr_db": ("nullable", "number")}
_DRIFT = {"latent_mse": "nonneg", "pixel_mse": "nonneg", "pixel_psnr_db": ("nullable", "number")}
_SHARES = {"images": "int", "base": "nonneg", "finetuned": "nonneg", "plain": ("nullable", "nonneg")}
_LAYER_DIMS = {"in_features": "int", "global": "int", "per_timestep": ("map", "int"), "tau": ("nullable", "number")}
REPORT_SCHEMA: dict[str, Any] = {
    "format_version": "int",
    "run_dir": "str",
    "created": "str",
    "model": {"backend": ("enum", "sd", "lcm"), "path": "str"},
    "sampling": {"scheduler": "str", "num_inference_steps": "int", "guidance_scale": "number", "height": "int",
                 "width": "int", "seed_rule": "str"},
    "projection_mode": "str",
    "adapter": ("enum", "lora", "full"),
    "lora_scale": "number",
    "prompts": ("list", {"prompt": "str", "kind": ("enum", "instance", "class", "holdout", "custom"),
                         "seeds": ("list", "int"), "base": ("list", "str"), "finetuned": ("list", "str"), **_DRIFT,
                         "plain": ("nullable", {"files": ("list", "str"), **_DRIFT})}),
    "drift": {"definition": "str", "holdout": ("nullable", _DRIFT_MEAN), "instance": ("nullable", _DRIFT_MEAN)},
    "preservation": ("nullable", {"source": "str", "mode": ("nullable", "str"), "overall": ("nullable", "nonneg"),
                                  "max": ("nullable", "nonneg"), "per_layer": ("map", ("nullable", "nonneg")),
                                  "per_timestep": ("map", ("nullable", "nonneg")), "unprotected": ("list", "str")}),
    "null_space": ("nullable", {"threshold": {"kind": "str", "value": "number"}, "timesteps": ("list", "int"),
                                "text": ("nullable", {"layers": ("list", "str"), "in_features": "int", "dim": "int",
                                                      "tau": ("nullable", "number")}),
                                "layers": ("map", _LAYER_DIMS)}),
    "baseline": ("nullable", {"run_dir": "str", "mode": ("nullable", "str"),
                              "preservation_overall": ("nullable", "nonneg"),
                              "preservation_per_timestep": ("map", ("nullable", "nonneg")),
                              "drift_holdout": ("nullable", _DRIFT_MEAN)}),
    "probe": ("nullable", {"definition": "str", "concept_accuracy": ("nullable", _SHARES),
                           "subject_fidelity": ("nullable", _SHARES), "class_as_subject": ("nullable", _SHARES)}),
    "files": {"grid": "str", "report_md": "str", "latents": "str", "plots": ("map", "str")},
}


def _check(value: Any, spec: Any, path: str) -> None:
    def fail(expected: str) -> None:
        raise NullBoothError(f"{path}: expected {expected}, got {type(value).__name__} {value!r:.60}")

    is_number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if spec == "int":
        if not (isinstance(value, int) and not isinstance(value, bool)):
            fail("an integer")
    elif spec == "number":
        if not is_number:
            fail("a finite number")
    elif spec == "nonneg":
        if not (is_number and value >= 0):
            fail("a finite number ≥ 0")
    elif spec == "str":
        if not isinstance(value, str):
            fail("a string")
    elif isinstance(spec, dict):
        if not isinstance(value, dict):
            fail("an object")
        missing, extra = sorted(set(spec) - set(value)), sorted(set(value) - set(spec))
        if missing or extra:
            raise NullBoothError(f"{path}: " + "; ".join(
                ([f"missing key(s) {', '.join(missing)}"] if missing else [])
                + ([f"unknown key(s) {', '.join(extra)}"] if extra else [])))
        for key, sub in spec.items():
            _check(value[key], sub, f"{path}.{key}")
    elif spec[0] == "nullable":
        if value is not None:
            _check(value, spec[1], path)
    elif spec[0] == "enum":
        if value not in spec[1:]:
            fail("one of " + ", ".join(map(repr, spec[1:])))
    elif spec[0] == "list":
        if not isinstance(value, list):
            fail("a list")
        for i, item in enumerate(value):
            _check(item, spec[1], f"{path}[{i}]")
    elif spec[0] == "map":
        if not isinstance(value, dict):
            fail("an object")
        for key, item in value.items():
            _check(item, spec[1], f"{path}.{key}")


def check_report(report: Any) -> None:
    """Raise NullBoothError naming the first field of `report` that does not follow REPORT_SCHEMA."""
    if isinstance(report, dict) and report.get("format_version") == 2 and "adapter" not in report:
        report.update(format_version=FORMAT_VERSION, adapter=ADAPTERS_BEFORE_VERSION_3)  # upgrade in memory
    _check(report, REPORT_SCHEMA, "report")
    if report["format_version"] != FORMAT_VERSION:
        raise NullBoothError(f"report.format_version: this NullBooth reads {FORMAT_VERSION}, "
                             f"got {report['format_version']}")


def read_report(run: RunDir) -> dict:
    """A run's validated report.json."""
    if not run.exists(REPORT_JSON):
        raise NullBoothError(f"{run.uri(REPORT_JSON)} does not exist: run `nullbooth generate` on that run first")
    report = run.read_json(REPORT_JSON)
    try:
        check_report(report)
    except NullBoothError as err:
        raise NullBoothError(f"{run.uri(REPORT_JSON)}: {err}") from None
    return report
