"""Names from users that become path segments (job names, node groups, served-model and adapter
labels) and the one check every join of such a name to a root goes through.

A name is `[A-Za-z0-9][A-Za-z0-9._-]{0,127}` without `..`: no separators, no traversal, no
leading dot or dash, nothing a shell or Ray/Serve would read another way. `inside` normalises a
join and refuses one that leaves its root, so a value that slipped past validation still cannot
make ray_ft write elsewhere.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ray_ft.errors import RayFTError

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)
# The same names as one regular expression without look-arounds (JSON Schema `pattern`, pydantic's
# Rust regex): every '.' is followed by a character other than '.', or ends the name; the length
# (at most 128) is checked apart.
SAFE_NAME_REGEX = r"^[A-Za-z0-9](?:[A-Za-z0-9_-]|\.[A-Za-z0-9_-])*\.?$"


def name_problem(value: object) -> str | None:
    """Why `value` is not a safe name, or None when it is one."""
    if not isinstance(value, str) or not value:
        return "must be a non-empty string"
    if len(value) > 128:
        return f"is {len(value)} characters long; at most 128"
    if ".." in value:
        return "may not contain '..'"
    if not _NAME.fullmatch(value):
        return (f"must match {NAME_PATTERN} (letters, digits, '.', '_', '-'; starting with a letter or digit): "
                "it becomes a folder or file name")
    return None


def check_name(value: object, field: str) -> str:
    """`value` when it is a safe name, else a ValueError naming `field` (a config validator)."""
    problem = name_problem(value)
    if problem:
        raise ValueError(f"{field}={value!r} {problem}")
    return value


def inside(root: Path | str, *parts: str) -> Path:
    """`root / parts...` made absolute; a RayFTError when it is not under `root`. The check is on
    the normalised path (`..` and absolute parts), not through symlinks: a run folder the user
    linked to another disk is theirs to place."""
    base = Path(os.path.abspath(root))
    path = Path(os.path.abspath(base.joinpath(*parts)))
    if path != base and base not in path.parents:
        raise RayFTError(f"{'/'.join(parts)}: resolves to {path}, outside {base}; names may not leave their folder")
    return path
