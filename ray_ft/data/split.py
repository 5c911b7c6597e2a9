"""Seeded splits by group, so no group (passage, context) lands in two halves."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")


def split_by_group(
    items: Sequence[T], group_of: Callable[[T], str], held_out_share: float, seed: int
) -> tuple[list[T], list[T]]:
    """Return (kept, held_out): a seeded `held_out_share` of the groups goes to held_out.

    Groups are sorted before shuffling so the result depends only on the seed and the set of
    groups, not on input order.
    """
    groups = sorted({group_of(it) for it in items})
    rng = random.Random(seed)
    rng.shuffle(groups)
    # At least one group out, and at least one kept: a split that empties either half is no split.
    n_out = min(len(groups) - 1, max(1, round(len(groups) * held_out_share))) if len(groups) > 1 else 0
    held = set(groups[:n_out])
    kept = [it for it in items if group_of(it) not in held]
    out = [it for it in items if group_of(it) in held]
    return kept, out


def order_key(seed: int, key: str) -> str:
    """A stable pseudo-random sort key: the same seed and key always give the same order."""
    return hashlib.sha1(f"{seed}:{key}".encode()).hexdigest()


def seeded_sample(items: Sequence[T], key_of: Callable[[T], str], n: int | None, seed: int) -> list[T]:
    """Pick n items in a seeded order that is independent of input order."""
    ordered = sorted(items, key=lambda it: order_key(seed, key_of(it)))
    return ordered if n is None else ordered[:n]
