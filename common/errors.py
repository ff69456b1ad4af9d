"""Known errors: the ones a user can fix, so they end a command with one line, not a traceback.

Every error the project raises on purpose (a bad data layout or label file, a bad config key or
value, unusable weights, a missing file, an output that cannot be written, a bad argument) is a
`UserError`. A command-line entry point wrapped by `common.cli.entry_point` prints it as
`error: <message>` on stderr and exits with status 2; any other exception is a bug and keeps
its traceback. The message names the file or key and the reason.

The subclasses also derive from the built-in type that callers and tests already catch
(ValueError, KeyError, FileExistsError, OSError), so `except ValueError` keeps working.
"""
from __future__ import annotations


class UserError(Exception):
    """Base class of the errors a user can fix; `str(err)` is the whole message."""


class UsageError(UserError, ValueError):
    """A bad command-line argument or function argument (a count below 1, an unknown device...)."""


class DataLayoutError(UserError, ValueError):
    """A data root, label file or folds file that cannot be read; the message names the file
    and the reason. (Defined here so that every module reading data raises the same one.)"""


class ConfigError(UserError, ValueError):
    """A config key that does not exist, or a value of the wrong type or range; the message
    names the key. (Defined here, below `configs`, so every stage can raise it.)"""


class UnknownNameError(UserError, KeyError):
    """A name that is not in its registry (an expert, an expert kind, an editing op)."""

    def __str__(self) -> str:  # KeyError's own str() would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class OutputExistsError(UserError, FileExistsError):
    """An output that would overwrite or mix with files that are already there."""


class WriteError(UserError, OSError):
    """An output that cannot be written (a full disk, no permission); `common.files` raises it
    after removing its temp file, so the previous version of the file, if any, is unchanged."""
