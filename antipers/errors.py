"""What counts as the user's mistake.

Every error a user can cause by what they give (a file, a field, a value) derives
from ``UserError``: the CLI prints it as one line and exits 2. Anything else is a bug
in antipers and keeps its traceback (exit 1), so it can be reported.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake in the user's input; ``str()`` names the file, field or value."""


# Paths the user named that cannot be used (missing, not a folder, no permission):
# the OS's message names the path, which is all the user needs.
PATH_ERRORS: tuple[type[OSError], ...] = (
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, (UserError, *PATH_ERRORS))


class MissingExtra(UserError, ModuleNotFoundError):
    """An optional package that this feature needs is not installed; the message
    says which ``pip install`` adds it."""


class ComponentUnavailable(UserError):
    """A component cannot run here for want of something the user configures (an
    upscaler folder, weights): its experiment is stored with status ``unavailable`` and
    this message, as an unavailable metric is, and not retried (the spec that would run
    it names the missing thing, so configuring it makes a new experiment)."""
