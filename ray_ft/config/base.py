"""The base of every config class (unknown keys are errors, objects are immutable) and the type of
the names that become folder, file or Serve names (`ray_ft.paths`)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from ray_ft.paths import name_problem


class _Strict(BaseModel):
    # validate_default: an int default of a float field becomes a float, as the same value read
    # back from config.resolved.yaml does (2 vs 2.0 made stage hashes differ).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _safe_name(value: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ValueError(f"{value!r} {problem}")
    return value


SafeName = Annotated[str, AfterValidator(_safe_name)]


def safe_keys(mapping: dict) -> dict:
    """A dict whose keys become names: each must be a SafeName (a ValueError naming the key)."""
    for key in mapping:
        problem = name_problem(key)
        if problem:
            raise ValueError(f"name {key!r} {problem}")
    return mapping
