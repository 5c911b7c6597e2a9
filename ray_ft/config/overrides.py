"""Command-line overrides of a job file: `ray-ft run JOB.yaml train.learning_rate=1e-4 eval.max_samples=20`.

Each override is `dotted.key=value`; the value is read as YAML (`20` an int, `[a, b]` a list,
`null` None, anything else a string), merged into the parsed file before validation, so an
override gets the same checks and the same one-line errors as the file, naming the override.
"""

from __future__ import annotations

import copy

import yaml

from ray_ft.errors import RayFTError


def parse_override(text: str) -> tuple[tuple[str, ...], object]:
    """`a.b.c=value` -> (("a", "b", "c"), value read as YAML)."""
    key, sep, raw = text.partition("=")
    parts = tuple(key.strip().split("."))
    if not sep or not all(parts):
        raise RayFTError(f"override '{text}': expected dotted.key=value (e.g. train.learning_rate=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise RayFTError(f"override '{text}': value is not valid YAML: {getattr(err, 'problem', err)}") from None
    return parts, value


def apply_overrides(data: dict, overrides: list[str] | tuple[str, ...]) -> dict:
    """A copy of the parsed job file with each override set; later overrides win."""
    out = copy.deepcopy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if child is None:  # `section:` left empty in the file
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RayFTError(f"override '{text}': '{'.'.join(parts[:i + 1])}' is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def override_for(loc: tuple, overrides: list[str] | tuple[str, ...]) -> str | None:
    """The last override that set the field at validation-error location `loc` (or a section above it)."""
    hit = None
    for text in overrides:
        parts, _ = parse_override(text)
        if tuple(str(p) for p in loc[:len(parts)]) == parts or tuple(str(p) for p in loc) == parts[:len(loc)]:
            hit = text
    return hit
