"""What the CLI and the jobs share: the `--config/--set` arguments and the user-error boundary.

A user error (NullBoothError, also when raised inside a Ray actor or task) prints one line and exits with 2;
nothing else is swallowed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from nullbooth.config import Config, load_config
from nullbooth.errors import NullBoothError

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"


def add_config_arguments(parser: argparse.ArgumentParser, positional: bool = True, optional: bool = False) -> None:
    if positional:
        parser.add_argument("config", nargs="?" if optional else None, default=None,
                            help="YAML config" + (f" (default: {DEFAULT_CONFIG.name})" if optional else ""))
    else:
        parser.add_argument("--config", required=not optional, default=None, help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set sampling.num_inference_steps=8 (repeatable)")


def config_from_args(args: argparse.Namespace, default: Path | None = None) -> Config:
    path = args.config or default
    return load_config(path, args.overrides)


def user_error(err: BaseException) -> NullBoothError | None:
    """The NullBoothError behind `err`, unwrapping Ray's task and actor errors."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, NullBoothError) and type(err) is NullBoothError:
            return err
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, BaseException):
            err = cause
        elif isinstance(err, NullBoothError):
            return NullBoothError(str(err).strip().splitlines()[-1])
        else:
            err = err.__cause__
        seen += 1
    return None


def guarded(main: Callable[[], int | None]) -> int:
    """Run `main`, turning a user error into one line on stderr and exit status 2."""
    try:
        return main() or 0
    except KeyboardInterrupt:
        print("nullbooth: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - only user errors are handled, the rest is re-raised
        found = user_error(err)
        if found is None:
            raise
        print(f"nullbooth: error: {found}", file=sys.stderr)
        return 2
