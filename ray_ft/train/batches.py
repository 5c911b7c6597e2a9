"""Training batches from the prepared shards: padded examples or packed rows.

Padded rows carry an attention mask (right padding). Packed rows carry `position_ids` that restart
per example and no attention mask: the model, loaded with `ray_ft.train.attention`'s attention,
cuts each row where the position ids restart and attends within each example only (see
`ray_ft.data.packing`). The padding a batch of packed rows still needs is a segment of its own
(positions 0, 1, ...), so it never joins a real example's attention.

Where the attention cuts rows per example by itself (ray_ft's packed SDPA, flash-attention's varlen
path), a batch of packed rows is flattened into one row instead of padded ("padding-free", as
transformers' DataCollatorWithFlattening): no padding tokens go through the projections, MLP and
LM head. transformers' "sdpa" or "eager" would build a mask over the whole flattened row (cost
quadratic in its length), so those keep one padded row per packed row.
"""

from __future__ import annotations

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from ray_ft.data.tokenize import IGNORE_INDEX
from ray_ft.train.attention import PACKED_SDPA

# Attentions that split a row at position-id restarts without a mask over the whole row.
PER_EXAMPLE_ATTENTIONS = (PACKED_SDPA, "flash_attention_2", "flash_attention_3")


def flattens(attn_implementation: str | None) -> bool:
    """Whether packed rows are trained flattened into one row under this attention."""
    return attn_implementation in PER_EXAMPLE_ATTENTIONS


def flatten_collate(batch: dict) -> dict:
    """numpy batch of packed rows -> one row [1, total tokens] (rows end to end, position ids kept).

    Every example's first label is already masked (`ray_ft.data.packing`), so the last token of one
    row is not trained to predict the first of the next.
    """
    import torch

    def cat(key):
        return torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64) for x in batch[key]])[None])

    out = {k: cat(k) for k in ("input_ids", "labels", "position_ids")}
    return out | {"num_real_tokens": torch.tensor(out["input_ids"].shape[1]),
                  "num_examples": torch.tensor(int((out["position_ids"] == 0).sum()))}


def pad_collate(batch: dict, pad_id: int, flatten: bool = False) -> dict:
    """numpy batch of ragged `input_ids`/`labels` (and `position_ids` when packed) -> torch tensors.

    `num_real_tokens` (a 0-d tensor) counts the non-padding tokens, for the padding ratio;
    `num_examples` the training examples in the batch (a packed row holds several: one per
    position-id restart).
    `flatten`: packed rows go end to end in one row (`flatten_collate`) instead of being padded.
    """
    import torch

    seqs, labs = batch["input_ids"], batch["labels"]
    packed = "position_ids" in batch
    if packed and flatten:
        return flatten_collate(batch)
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
    examples = sum(int((np.asarray(p) == 0).sum()) for p in batch["position_ids"]) if packed else n
    out = {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
           "num_real_tokens": torch.tensor(int(mask.sum())), "num_examples": torch.tensor(examples)}
    if packed:
        out["position_ids"] = torch.from_numpy(positions)
    else:
        out["attention_mask"] = torch.from_numpy(mask)
    return out


class PadCollate(NumpyBatchCollateFn):
    """Ray Data collate callable (the class form Ray 2.47+ asks for) around `pad_collate`."""

    def __init__(self, pad_id: int, flatten: bool = False):
        self.pad_id, self.flatten = pad_id, flatten

    def __call__(self, batch: dict):
        return pad_collate(batch, self.pad_id, self.flatten)


def answer_tokens(batch: dict) -> int:
    """Positions the causal-LM loss averages over: labels after the shift (transformers'
    ForCausalLMLoss) that are not ignored."""
    return int((batch["labels"][..., 1:] != IGNORE_INDEX).sum())


def model_inputs(batch: dict, device) -> dict:
    """The keyword arguments of the model's forward: no cache (a cache disables the packed mask)."""
    keys = ("input_ids", "labels", "attention_mask", "position_ids")
    return {k: batch[k].to(device) for k in keys if k in batch} | {"use_cache": False}
