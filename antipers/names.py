"""Names that become part of a path (a search's name, a suite, an identity): checked
where they enter, so no user string can climb out of the folder it is joined to."""

from __future__ import annotations

import re

from antipers.errors import UserError

_STRICT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class UnsafeName(UserError, ValueError):
    """A name that cannot be part of a path; the message names the field."""


def check_name(value: object, field: str, strict: bool = True) -> str:
    """``strict``: letters, digits, ``.``, ``_``, ``-`` (starting with a letter or digit),
    at most 100. Otherwise (identities, which are folder names a dataset already has)
    anything but a path separator, a NUL, ``.`` and ``..``."""
    if not isinstance(value, str) or not value:
        raise UnsafeName(f"{field}: expected a non-empty name, got {value!r}")
    if strict:
        if not _STRICT.fullmatch(value) or ".." in value:
            raise UnsafeName(
                f"{field}: {value!r} is not a safe name; use letters, digits, '.', '_' "
                "and '-' (at most 100, starting with a letter or digit)"
            )
    elif value in (".", "..") or any(c in value for c in "/\\\0"):
        raise UnsafeName(f"{field}: {value!r} cannot be part of a path (no '/', '\\\\' or '..')")
    return value
