"""The configuration reference, generated from the config tree: every field of `JobConfig` with
its type, default and description, one table per section, as Markdown.

    python -m ray_ft.config.reference > docs/CONFIG.md

`tests/test_config.py` checks that docs/CONFIG.md is what this prints, so the reference cannot
fall behind the code.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

HEADER = ("# Configuration reference\n\nGenerated from `ray_ft.config.JobConfig` by `python -m "
          "ray_ft.config.reference` (a test keeps it current). A job file mirrors this tree one to one: "
          "unknown keys and bad values are rejected with the field path. `NAME` stands for a key of "
          "a mapping, `[]` for an item of a list.\n")


def _type(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{a}`" if a is not None else "None" for a in args)
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type(a) for a in args)
    if origin is typing.Annotated:
        return _type(args[0])
    if origin in (list, tuple, set):
        return f"list[{', '.join(_type(a) for a in args if a is not Ellipsis)}]"
    if origin is dict:
        return f"dict[{', '.join(_type(a) for a in args)}]"
    if annotation is type(None):
        return "None"
    return getattr(annotation, "__name__", str(annotation))


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, dict) and any(isinstance(v, BaseModel) for v in value.values()):
        return f"`{{{', '.join(map(repr, value))}: ...}}`"
    text = repr(value) if not isinstance(value, str) else f'"{value}"'
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"`{text}`".replace("|", "\\|")


def _models_in(annotation: Any) -> list[tuple[str, type[BaseModel]]]:
    """(path suffix, model) of the config sections an annotation holds: itself, Optional[...],
    dict[str, Model] ('.NAME') or list[Model] ('[]')."""
    origin, args = get_origin(annotation), get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [("", annotation)]
    if origin in (typing.Union, types.UnionType, typing.Annotated):
        return [m for a in args for m in _models_in(a)]
    if origin is dict and len(args) == 2:
        return [(".NAME" + s, m) for s, m in _models_in(args[1])]
    if origin in (list, tuple) and args:
        return [("[]" + s, m) for s, m in _models_in(args[0])]
    return []


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """Every config section under `model`, depth first: (path, model)."""
    out = [(prefix, model)]
    for name, field in model.model_fields.items():
        for suffix, sub in _models_in(field.annotation):
            out += sections(sub, f"{prefix}{name}{suffix}.")
    return out


def markdown(root: type[BaseModel] | None = None) -> str:
    if root is None:
        from ray_ft.config import JobConfig

        root = JobConfig
    parts, seen = [HEADER], set()
    for path, model in sections(root):
        if path in seen:
            continue
        seen.add(path)
        rows = []
        for name, field in model.model_fields.items():
            if any(suffix == "" for suffix, _ in _models_in(field.annotation)) and field.default_factory is not None:
                continue  # a section of its own, below (mappings and lists of sections stay listed)
            desc = " ".join((field.description or "").split()).replace("|", "\\|")
            rows.append(f"| `{path}{name}` | {_type(field.annotation)} | {_default(field)} | {desc} |")
        if not rows:
            continue
        doc = " ".join((model.__doc__ or "").split()) if model.__doc__ and model is not root else ""
        parts.append(f"## `{path.rstrip('.') or 'job'}` ({model.__name__})\n\n" + (f"{doc}\n\n" if doc else "")
                     + "| field | type | default | description |\n|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


if __name__ == "__main__":
    print(markdown(), end="")
