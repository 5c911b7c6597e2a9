"""Sequence packing: several tokenized examples in one training row, attention kept apart.

A packed row is the concatenation of its examples' tokens with `position_ids` restarting at 0 for
each example. Given `position_ids` and no attention mask, the trainer's attention
(`ray_ft.train.attention`) cuts the row at the restarts and runs causal attention per example, so
no token attends to another example (transformers' own "sdpa" would build the equivalent
block-diagonal mask, `find_packed_sequence_indices`, and compute the masked pairs too). The first
label of every example is masked as well, so no example is trained to predict the start of the
next one from the end of the previous one.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ray_ft.data.tokenize import IGNORE_INDEX

PACKED_SCHEMA = pa.schema([
    ("ids", pa.list_(pa.string())),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("position_ids", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("num_examples", pa.int32()),
])


def first_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of example indices whose lengths sum to <= capacity (each length <= capacity).

    First-fit decreasing: longest first, each into the first bin with room. Bins come back ordered
    by their smallest index, so the packed rows follow the input's (seeded) order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"example {i} has {n} tokens > packing capacity {capacity}")
        for b, free in enumerate(room):
            if n <= free:
                bins[b].append(i)
                room[b] -= n
                break
        else:
            bins.append([i])
            room.append(capacity - n)
    for b in bins:
        b.sort()
    return sorted(bins, key=lambda b: b[0])


def pack_table(table: pa.Table, capacity: int) -> pa.Table:
    """Training rows (id, input_ids, labels, ...) -> packed rows (PACKED_SCHEMA)."""
    ids = table.column("id").to_pylist()
    input_ids = table.column("input_ids").to_pylist()
    labels = table.column("labels").to_pylist()
    cols: dict[str, list] = {name: [] for name in PACKED_SCHEMA.names}
    for members in first_fit_decreasing([len(x) for x in input_ids], capacity):
        row_ids, row_labels, row_pos = [], [], []
        for i in members:
            row_ids.extend(input_ids[i])
            lab = list(labels[i])
            lab[0] = IGNORE_INDEX
            row_labels.extend(lab)
            row_pos.extend(range(len(input_ids[i])))
        cols["ids"].append([ids[i] for i in members])
        cols["input_ids"].append(row_ids)
        cols["labels"].append(row_labels)
        cols["position_ids"].append(row_pos)
        cols["num_tokens"].append(len(row_ids))
        cols["num_examples"].append(len(members))
    return pa.Table.from_pydict(cols, schema=PACKED_SCHEMA)


def segment_ids(position_ids: np.ndarray) -> np.ndarray:
    """Per-token example index within each row, from position ids that restart at 0."""
    return np.cumsum(position_ids == 0, axis=-1) - 1
