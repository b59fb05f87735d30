"""The one exception type for mistakes a user can make (config, paths, data, mismatched runs), and how to find it
behind Ray's wrappers.

The CLI and the jobs print its message without a traceback and exit with status 2.
"""

from __future__ import annotations


class NullBoothError(Exception):
    """A user-facing error: the message names the key, file or value and what was expected."""


def user_error(err: BaseException | None) -> NullBoothError | None:
    """The NullBoothError behind `err`, unwrapping Ray's task and actor errors (None when there is none)."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, NullBoothError) and type(err) is NullBoothError:
            return err
        cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError keeps the original here
        if isinstance(cause, BaseException):
            err = cause
        elif isinstance(err, NullBoothError):
            # Ray's dual-class error (RayTaskError(NullBoothError)): its message is the remote traceback, whose
            # last line is the user's message.
            return NullBoothError(str(err).strip().splitlines()[-1])
        else:
            err = err.__cause__
        seen += 1
    return None
