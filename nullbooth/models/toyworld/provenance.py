"""Provenance helpers: which code made a file, digests that let anyone check shipped files are untouched, and the
staged output folder that makes a recipe's result appear whole or not at all."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from nullbooth.errors import NullBoothError


def code_version() -> dict[str, str | None]:
    """The package version and, when the package lives in a git checkout, its HEAD commit (None otherwise)."""
    try:
        version: str | None = metadata.version("nullbooth")
    except metadata.PackageNotFoundError:
        version = None
    commit = None
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10, check=False)
        commit = out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"package_version": version, "git_commit": commit}


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def digest_tree(root: str | os.PathLike, exclude: tuple[str, ...] = ("provenance.json",)) -> dict[str, str]:
    """sha256 of every file under `root`, keyed by its POSIX path relative to `root`, in sorted order."""
    root = Path(root)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() not in exclude)
    return {p.relative_to(root).as_posix(): sha256_file(p) for p in files}


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write JSON to a temporary name and rename it, so a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def check_new_output(out: str | os.PathLike, overwrite: bool, what: str) -> Path:
    """`out` as a Path; refuses an existing `out` unless `overwrite` (`what` names the output in the message)."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise NullBoothError(f"{what} {out}: already exists (pass --overwrite, or overwrite=True, to replace it)")
    return out


@contextmanager
def staged_folder(out: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside `out` to write into. When the block ends normally it is renamed to `out` (replacing
    an old `out`); when it raises, it is removed. So `out` is never half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
