"""Training batches from the prepared shards: padded examples or packed rows.

Padded rows carry an attention mask (right padding). Packed rows carry `position_ids` that restart
per example and no attention mask: the model, loaded with `ray_ft.train.attention`'s attention,
cuts each row where the position ids restart and attends within each example only (see
`ray_ft.data.packing`). The padding a batch of packed rows still needs is a segment of its own
(positions 0, 1, ...), so it never joins a real example's attention.
"""

from __future__ import annotations

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from ray_ft.data.tokenize import IGNORE_INDEX


def pad_collate(batch: dict, pad_id: int) -> dict:
    """numpy batch of ragged `input_ids`/`labels` (and `position_ids` when packed) -> torch tensors.

    `num_real_tokens` (a 0-d tensor) counts the non-padding tokens, for the padding ratio.
    """
    import torch

    seqs, labs = batch["input_ids"], batch["labels"]
    packed = "position_ids" in batch
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    positions = np.tile(np.arange(width, dtype=np.int64), (n, 1))
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = s
        labels[i, : len(lab)] = lab
        mask[i, : len(s)] = 1
        if packed:
            positions[i, : len(s)] = batch["position_ids"][i]
            positions[i, len(s):] = np.arange(width - len(s))
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
           "num_real_tokens": torch.tensor(int(mask.sum()))}
    if packed:
        out["position_ids"] = torch.from_numpy(positions)
    else:
        out["attention_mask"] = torch.from_numpy(mask)
    return out


class PadCollate(NumpyBatchCollateFn):
    """Ray Data collate callable (the class form Ray 2.47+ asks for) around `pad_collate`."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict):
        return pad_collate(batch, self.pad_id)


def model_inputs(batch: dict, device) -> dict:
    """The keyword arguments of the model's forward: no cache (a cache disables the packed mask)."""
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    return {k: batch[k].to(device) for k in keys if k in batch} | {"use_cache": False}
