"""Where built models and drawn images are cached, how they are built exactly once, and a quiet model loader.

Nothing here knows a particular model: the embedded models (tiny.py), the demo subject (subject.py) and the
benchmarks' models all cache through `build_once`.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where built tiny models and the demo subject are cached: $NULLBOOTH_CACHE, else ~/.cache/nullbooth."""
    env = os.environ.get("NULLBOOTH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nullbooth"


def build_once(dest: Path, build: Callable[[Path], object]) -> Path:
    """Return `dest`, building it with `build(tmp_dir)` first if it does not exist yet.

    The build goes to a temporary directory beside `dest` that is renamed into place, so `dest` is either absent
    or complete. Several processes (e.g. Ray actors) may race: the first rename wins, the others discard their
    copy; the builds are deterministic, so which one wins does not matter.
    """
    if dest.is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp made it 0700; a cache on shared storage must be readable by other accounts
        try:
            os.rename(tmp, dest)
        except OSError as e:
            # Linux refuses to rename a directory onto a non-empty one: another builder got there first.
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not dest.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def quiet_loading() -> None:
    """Loading bars and info logs of diffusers/transformers would drown the project's own progress in actors."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
