"""Attention for packed rows that computes only what it keeps: causal SDPA per packed example.

A packed row holds several examples whose position ids restart at 0. transformers' "sdpa"
attention builds a block-diagonal causal mask for such a row, and SDPA with a dense mask computes
every (query, key) pair of the whole row before masking: 2,048^2 pairs for a row of two 1,024-token
examples, where causal attention within each example needs a quarter of that. This module
registers one more transformers attention implementation, `PACKED_SDPA`, that cuts each row at its
position-id restarts and runs causal SDPA on each example (the kernel skips the upper triangle).
Loss and gradients equal "sdpa" with the block-diagonal mask (tests/train/test_attention.py);
measured in bench/packed_attention.py and bench/train_sft.py.

Everything else goes to transformers' own SDPA with the mask it would build for "sdpa": padded
batches (a 2-D attention mask), generation with a KV cache, sliding-window and soft-capped layers.
"""

from __future__ import annotations

PACKED_SDPA = "ray_ft_packed_sdpa"


def example_bounds(position_ids, batch: int, length: int) -> list[list[int]]:
    """Per row, the start of every example and the row's end: a new example starts where the
    position id does not follow the one before (the same rule transformers uses for packing).

    Every layer gets the same `position_ids` tensor, so the answer is kept on that tensor object
    (keyed by shape and its in-place version counter): one device sync per forward, not per layer,
    and none when gradient checkpointing recomputes a layer.
    """
    key = (batch, length, position_ids._version)
    memo = getattr(position_ids, "_ray_ft_bounds", None)
    if memo is not None and memo[0] == key:
        return memo[1]
    bounds = _cut_rows(position_ids, batch, length)
    position_ids._ray_ft_bounds = (key, bounds)
    return bounds


def _cut_rows(position_ids, batch: int, length: int) -> list[list[int]]:
    import torch

    pos = position_ids.expand(batch, length)
    starts = (torch.diff(pos, dim=-1) != 1).nonzero().tolist()  # the device sync
    bounds = [[0] for _ in range(batch)]
    for row, t in starts:
        bounds[row].append(t + 1)
    return [b + [length] for b in bounds]


def packed_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                          scaling: float | None = None, is_causal: bool | None = None,
                          position_ids=None, **kwargs):
    """transformers attention interface: (module, q, k, v [batch, heads, len, dim], mask) ->
    (output [batch, len, heads, dim], None)."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q_len, batch = query.shape[2], query.shape[0]
    own = (attention_mask is None and position_ids is not None and q_len == key.shape[2]
           and getattr(module, "is_causal", True) and getattr(module, "sliding_window", None) is None
           and kwargs.get("softcap") is None and kwargs.get("s_aux") is None)
    if not own:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, cuts in enumerate(example_bounds(position_ids, batch, q_len)):
        rows.append(torch.cat([
            F.scaled_dot_product_attention(
                query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
            for s, e in zip(cuts[:-1], cuts[1:]) if e > s], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def packed_sdpa_mask(*args, attention_mask=None, q_length: int = 0, kv_length: int = 0,
                     q_offset: int = 0, **kwargs):
    """No mask where `packed_sdpa_attention` cuts rows itself (no padding mask given, no cache);
    else the mask "sdpa" would get."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None and q_length == kv_length and not q_offset:
        return None
    return sdpa_mask(*args, attention_mask=attention_mask, q_length=q_length, kv_length=kv_length,
                     q_offset=q_offset, **kwargs)


def register_packed_sdpa() -> str:
    """Make `PACKED_SDPA` a valid `attn_implementation` in this process; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(PACKED_SDPA, packed_sdpa_attention)
    AttentionMaskInterface.register(PACKED_SDPA, packed_sdpa_mask)
    return PACKED_SDPA
