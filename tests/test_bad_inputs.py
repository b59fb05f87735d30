"""Bad inputs through the command line, as a user meets them: one table, one subprocess per row.

Every row must be refused with exit status 2 and exactly one line on stderr that names the key or the file, with no
traceback, and must leave the case's folder — a run_dir pre-populated with a few files, the config file and anything
else the row made — exactly as it was (every path listed, every file's sha256). The config rows are generated from
the typed config dataclasses (nullbooth/config/sections.py): every key gets NaN, +inf and -inf (numbers), a value of
the wrong type, null where the key is not optional, and a value outside its declared min/max/choices, so a new key
is covered without touching this file. Hand-written rows (`EXTRA_ROWS`, `FILE_ROWS`) cover the rules that span keys
and the file cases; add a row there to cover a new case.

Rows run `nullbooth run --config X`, the command that would do the most work if a bad input slipped through; each
has a timeout, so a row that is not refused fails instead of running the pipeline.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import struct
import subprocess
import sys
import types
import typing
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from nullbooth.config import THRESHOLD_RANGES, Config

ROOT = Path(__file__).resolve().parent.parent
BASE_CONFIG = ROOT / "configs" / "tiny.yaml"
TIMEOUT_S = 120  # a row that is not refused up front would start Ray and sample: fail it rather than wait


@dataclass(frozen=True)
class Row:
    """One bad input. `values` are dotted config keys set in a copy of configs/tiny.yaml (run_dir points into the
    case's folder); `prepare(folder)` makes files the row needs and returns more dotted values; `config_bytes`
    replaces the config file's content altogether; `names` must appear in the one error line."""

    id: str
    names: str
    values: dict[str, Any] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    command: str = "run"
    prepare: Callable[[Path], dict[str, Any]] | None = None
    config_bytes: bytes | None = None


# -- rows generated from the config dataclasses ------------------------------------------------------------------------
def config_keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any, dataclasses.Field]]:
    """(dotted key, type hint, field) of every key, sections included, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        key, hint = f"{prefix}{f.name}", hints[f.name]
        out.append((key, hint, f))
        if dataclasses.is_dataclass(hint):
            out += config_keys(hint, f"{key}.")
    return out


def split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type inside `X | None`, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner[0], len(inner) < len(typing.get_args(hint))
    return hint, False


def wrong_type(hint: Any) -> Any:
    """A YAML value of another type than `hint`: a string for numbers and booleans, a list for strings, a mapping
    for lists, a list for sections."""
    if dataclasses.is_dataclass(hint):
        return [1, 2]
    if hint in (int, float, bool):
        return "not-a-value"
    if hint is str:
        return ["a", "list"]
    return {"a": 1}


def out_of_range(hint: Any, meta: typing.Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(label, value) just outside each declared bound: below min (at min when it is exclusive), above max, not one
    of the choices."""
    rows = []
    if "min" in meta:
        low = meta["min"]
        rows.append(("at-exclusive-min" if meta.get("min_exclusive") else "below-min",
                     low if meta.get("min_exclusive") else (low - 1 if hint is int else low - 0.5)))
    if "max" in meta:
        rows.append(("above-max", meta["max"] + (1 if hint is int else 0.5)))
    if "choices" in meta:
        rows.append(("not-a-choice", "no-such-choice"))
    return rows


def generated_rows() -> list[Row]:
    rows = []
    for key, hint, f in config_keys():
        inner, optional = split_optional(hint)
        rows.append(Row(f"{key}=wrong-type", key, {key: wrong_type(inner)}))
        if dataclasses.is_dataclass(inner):
            continue
        if not optional:
            rows.append(Row(f"{key}=null", key, {key: None}))
        if inner in (int, float):
            rows += [Row(f"{key}={label}", key, {key: value})
                     for label, value in (("nan", math.nan), ("+inf", math.inf), ("-inf", -math.inf))]
        rows += [Row(f"{key}={label}", key, {key: value}) for label, value in out_of_range(inner, f.metadata)]
    return rows


# -- hand-written rows: rules that span keys, --set, the config file itself ---------------------------------------------
def threshold_rows() -> list[Row]:
    """The threshold value at the top of its kind's range, where the null space would be the whole input space."""
    rows = [Row(f"threshold-{kind}-at-{high:g}", "projection.threshold.value",
                {"projection.threshold.kind": kind, "projection.threshold.value": high})
            for kind, (_, high) in THRESHOLD_RANGES.items() if not math.isinf(high)]  # absolute: +inf is generated
    rows.append(Row("threshold-percentile-150", "projection.threshold.value",
                    {"projection.threshold.kind": "percentile", "projection.threshold.value": 150}))
    return rows


EXTRA_ROWS = [
    *threshold_rows(),
    Row("unknown-key", "sampling.stepz", {"sampling.stepz": 9}),
    Row("unknown-section", "sampler", {"sampler": {"scheduler": "ddim"}}),
    Row("layers-item-not-a-string", "covariance.layers", {"covariance.layers": [1]}),
    Row("layers-empty", "covariance.layers", {"covariance.layers": []}),
    Row("run_dir-empty", "run_dir", {"run_dir": "  "}),
    Row("height-not-a-multiple-of-8", "sampling.height", {"sampling.height": 36}),
    Row("lcm-backend-with-ddim", "sampling.scheduler", {"model.backend": "lcm"}),
    Row("sd-backend-with-lcm-sampler", "sampling.scheduler", {"sampling.scheduler": "lcm"}),
    Row("prior-preservation-without-class-prompt", "train.class_prompt",
        {"train.with_prior_preservation": True, "train.class_prompt": None}),
    Row("two-baselines", "generate.baseline_run", {"train.plain_baseline": True, "generate.baseline_run": "/tmp/b"}),
    Row("baseline-of-a-plain-run", "train.plain_baseline", {"train.plain_baseline": True, "projection.mode": "none"}),
    Row("set-nan", "train.learning_rate", args=("--set", "train.learning_rate=.nan")),
    Row("set-without-equals", "--set", args=("--set", "train.learning_rate")),
    Row("set-into-a-value", "--set", args=("--set", "run_dir.x=1")),
    Row("set-bad-yaml", "--set", args=("--set", "train.validation_prompts=[a, b")),
    Row("validate-nan", "train.learning_rate", {"train.learning_rate": math.nan}, command="validate"),
    Row("build-cov-inf", "sampling.guidance_scale", {"sampling.guidance_scale": math.inf}, command="build-cov"),
    Row("train-nan", "train.dropout", {"train.dropout": math.nan}, command="train"),
    Row("generate-nan", "generate.lora_scale", {"generate.lora_scale": -math.inf}, command="generate"),
]


def bomb_png(path: Path, width: int = 30000, height: int = 30000) -> None:
    """A valid PNG a few dozen bytes long whose header claims width × height pixels (past PIL's limit)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                     + chunk(b"IEND", b""))


def _bomb_folder(folder: Path) -> dict[str, Any]:
    images = folder / "subject"
    images.mkdir()
    bomb_png(images / "huge.png")
    return {"train.instance_data_dir": str(images)}


def _a_file(name: str, key: str) -> Callable[[Path], dict[str, Any]]:
    def prepare(folder: Path) -> dict[str, Any]:
        (folder / name).write_text("not a folder\n")
        return {key: str(folder / name)}
    return prepare


FILE_ROWS = [
    Row("config-not-utf8", "config.yaml", config_bytes=b"run_dir: caf\xe9\n"),
    Row("config-malformed-yaml", "config.yaml", config_bytes=b"run_dir: [unclosed\nmodel: {path: tiny\n"),
    Row("config-not-a-mapping", "config.yaml", config_bytes=b"- run_dir\n- model\n"),
    Row("config-missing", "missing.yaml", args=("--config", "missing.yaml")),
    Row("run_dir-is-a-file", "run_dir", prepare=_a_file("plain-file", "run_dir")),
    Row("run_dir-under-proc", "run_dir", {"run_dir": "/proc/nullbooth-run"}),
    Row("storage_path-is-a-file", "train.storage_path", prepare=_a_file("plain-file", "train.storage_path")),
    Row("prompts_file-uri", "preserve.prompts_file", {"preserve.prompts_file": "s3://bucket/prompts.txt"}),
    Row("prompts_file-missing", "preserve.prompts_file", {"preserve.prompts_file": "/nonexistent/prompts.txt"}),
    Row("instance-image-decompression-bomb", "huge.png", prepare=_bomb_folder),
]

ROWS = generated_rows() + EXTRA_ROWS + FILE_ROWS


# -- running a row -------------------------------------------------------------------------------------------------------
def set_dotted(raw: dict, key: str, value: Any) -> None:
    *sections, last = key.split(".")
    node = raw
    for name in sections:
        node = node.setdefault(name, {})
    node[last] = value


def populate_run_dir(run_dir: Path) -> None:
    """A run_dir that already holds something: a bad input must not touch it."""
    for rel, content in {"notes.txt": b"my notes\n", "covariance/old.safetensors": bytes(range(256)) * 4,
                         "lora/pytorch_lora_weights.safetensors": b"\x00fake lora",
                         "report/report.json": b'{"fake": true}\n'}.items():
        (run_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (run_dir / rel).write_bytes(content)


def snapshot(folder: Path) -> dict[str, str]:
    """Every path under `folder` -> "dir" or the sha256 of the file."""
    return {str(p.relative_to(folder)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def write_case(row: Row, folder: Path) -> Path:
    """The row's config file in `folder` (run_dir = folder/run, pre-populated)."""
    populate_run_dir(folder / "run")
    config = folder / "config.yaml"
    if row.config_bytes is not None:
        config.write_bytes(row.config_bytes)
        return config
    raw = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    raw["run_dir"] = str(folder / "run")
    values = {**row.values, **(row.prepare(folder) if row.prepare else {})}
    for key, value in values.items():
        set_dotted(raw, key, value)
    config.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return config


@pytest.mark.parametrize("row", ROWS, ids=[row.id for row in ROWS])
def test_bad_input_is_refused_in_one_line_before_anything_is_written(row, tmp_path):
    config = write_case(row, tmp_path)
    before = snapshot(tmp_path)
    args = row.args if "--config" in row.args else ("--config", str(config), *row.args)
    done = subprocess.run([sys.executable, "-m", "nullbooth", row.command, *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=TIMEOUT_S)
    lines = done.stderr.splitlines()
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert lines[0].startswith("nullbooth: error: ") and row.names in lines[0], lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert snapshot(tmp_path) == before


def test_the_table_covers_every_config_key_with_every_kind_of_bad_value():
    """The generated rows follow the dataclasses: every key, and every numeric key given NaN and ±inf."""
    ids = {row.id for row in ROWS}
    keys = config_keys()
    assert len(keys) > 80  # the walk reaches the nested sections (projection.threshold.*)
    for key, hint, f in keys:
        inner, _ = split_optional(hint)
        assert f"{key}=wrong-type" in ids
        if inner in (int, float):
            assert {f"{key}=nan", f"{key}=+inf", f"{key}=-inf"} <= ids
        for label, _ in out_of_range(inner, f.metadata):
            assert f"{key}={label}" in ids
    assert len(ids) == len(ROWS)  # ids are unique: pytest -k picks one row


def test_config_errors_are_refused_before_torch_ray_or_diffusers_are_imported(tmp_path):
    """What keeps every config row above at well under a second: the CLI reads and checks the config first."""
    config = write_case(Row("nan", "train.learning_rate", {"train.learning_rate": math.nan}), tmp_path)
    code = ("import sys; from nullbooth.cli import main; rc = main(['run', '--config', sys.argv[1]]); "
            "print(rc, *sorted(m for m in ('torch', 'ray', 'diffusers', 'transformers', 'PIL') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(config)], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.stdout == "2\n", done.stdout + done.stderr[-2000:]
