"""The one error tree of the package.

Every exception sa2va_hooks raises derives from :class:`Sa2vaHooksError`, through one of three
categories that carry the command-line exit code, so a CLI maps an error to its code by category
instead of by lists of classes kept by hand:

- :class:`BadInputError` (exit 2): the input is malformed, unsafe, unsupported or missing; it was
  refused before anything was written.
- :class:`MismatchError` (exit 1): what was checked is not what it should be (a snapshot against
  its manifest, a checkpoint against a model or its recorded fingerprints).
- :class:`ExportFailedError` (exit 2): the work could not be completed (ranks, disk, a model that
  changed under the export); nothing was published.

Each concrete class also keeps the builtin base it always had (``ValueError``, ``RuntimeError``,
``KeyError``...), so existing ``except`` clauses and user code keep working; the names and the
messages users see do not change.
"""
from __future__ import annotations

import pickle
from pathlib import Path


class Sa2vaHooksError(Exception):
    """Base of every error raised by sa2va_hooks."""

    exit_code = 2


class BadInputError(Sa2vaHooksError):
    """Malformed, unsafe, unsupported or missing input; refused before anything was written."""

    exit_code = 2


class MismatchError(Sa2vaHooksError):
    """What was checked is not what it should be."""

    exit_code = 1


class ExportFailedError(Sa2vaHooksError):
    """The export could not be completed; nothing was published."""

    exit_code = 2


def exit_code(error: BaseException) -> int:
    """The CLI exit code of an error: its category's, else 2 (the command could not run)."""
    return error.exit_code if isinstance(error, Sa2vaHooksError) else 2


class NotRegularFileError(BadInputError, OSError):
    """A path that must be a plain file is a symlink, a directory, a FIFO, a socket or a device. It
    is never opened: a FIFO blocks the reader forever, a symlink reads what lies outside the snapshot."""

    def __init__(self, path: str | Path, kind: str, advice: str = "", what: str = "") -> None:
        super().__init__(f"{what + ' ' if what else ''}{path} is {kind}, not a regular file{advice}")
        self.filename, self.kind = str(path), kind

    def __str__(self) -> str:  # OSError's would be "[Errno None] None: 'path'" once filename is set
        return self.args[0]


class UnknownConverterError(BadInputError, KeyError):
    """A converter name that is not registered. A ``KeyError`` for callers that catch one, with a
    plain message (``KeyError`` would print it quoted)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# Concrete forms of the categories for the builtin exceptions the package used to raise, so that
# ``except ValueError`` and friends keep catching them.
class BadValueError(BadInputError, ValueError):
    """An option or a value in a file is not acceptable."""


class BadTypeError(BadInputError, TypeError):
    """A value has the wrong type (a config entry, a header field)."""


class MissingFileError(BadInputError, FileNotFoundError):
    """A file or directory the command needs does not exist."""


class OutputExistsError(BadInputError, FileExistsError):
    """The output already exists and was not to be replaced."""


class DuplicateRegistrationError(BadInputError, KeyError):
    """A name registered twice."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DiskSpaceError(ExportFailedError, OSError):
    """Not enough free space for the export (checked before the first byte is written)."""


class InternalError(Sa2vaHooksError, RuntimeError):
    """A broken invariant of sa2va_hooks itself: a bug to report, not something the user did."""


class MissingDependencyError(BadInputError, ModuleNotFoundError):
    """An optional package a feature needs is not installed."""


class UnsafePickleError(BadInputError, pickle.UnpicklingError):
    """A pickle asks for a type or a call outside the allowlist; nothing in it was run."""
