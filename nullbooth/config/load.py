"""Loading a config: YAML file → `--set a.b=value` overrides → typed dataclasses (strict: an unknown key gets a
did-you-mean suggestion, a wrong type names the expected type) → validation (config/checks.py)."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from nullbooth.config.checks import validate
from nullbooth.config.sections import Config
from nullbooth.errors import NullBoothError


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML config (or the defaults when `path` is None), apply `a.b=value` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise NullBoothError(f"config file {str(path)!r} does not exist")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as err:
            raise NullBoothError(f"config file {str(path)!r} is not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise NullBoothError(f"config file {str(path)!r} is not valid YAML: {_yaml_problem(err)}") from None
        if not isinstance(raw, dict):
            raise NullBoothError(f"config file {str(path)!r} must hold a mapping of sections, got {type(raw).__name__}")
    for override in overrides:
        apply_override(raw, override)
    config = _build(Config, raw, prefix="")
    validate(config)
    return config


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own message runs over several lines with the source quoted)."""
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`1e-3`, `true`, `[a, b]`)."""
    key, sep, text = override.partition("=")
    if not sep or not key.strip():
        raise NullBoothError(f"--set {override!r}: expected KEY=VALUE, e.g. --set sampling.num_inference_steps=8")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as err:
        raise NullBoothError(f"--set {override!r}: the value is not valid YAML ({_yaml_problem(err)})") from None
    parts = key.strip().split(".")
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise NullBoothError(f"--set {override!r}: {'.'.join(parts[:depth + 1])!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    """Instantiate dataclass `cls` from a mapping, type-checking every value."""
    where = prefix.rstrip(".") or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise NullBoothError(f"{where}: expected a mapping of keys, got {_describe(raw)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known keys: {', '.join(fields)}"
            raise NullBoothError(f"unknown config key {prefix}{key}{hint}")
    values = {}
    for name, value in raw.items():
        values[name] = _coerce(hints[name], value, f"{prefix}{name}")
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is list:
        if not isinstance(value, list):
            raise NullBoothError(f"{key}: expected a list, got {_describe(value)}")
        return [_coerce(args[0], item, f"{key}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str:
        if isinstance(value, str):
            return value
    raise NullBoothError(f"{key}: expected {_type_name(hint)}, got {_describe(value)}")


def _type_name(hint: Any) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    return f"{type(value).__name__} {value!r}"
