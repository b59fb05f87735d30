"""The one exception type for mistakes a user can make (config, paths, data, mismatched runs).

The CLI and the jobs print its message without a traceback and exit with status 2.
"""


class NullBoothError(Exception):
    """A user-facing error: the message names the key, file or value and what was expected."""
