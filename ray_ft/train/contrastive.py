"""Contrastive (InfoNCE) embedding loss, cross-device negatives and GradCache; plain torch.

Batch layout (FlagEmbedding's): B queries and B * G passages, where passages[i*G] is query i's
positive and passages[i*G+1 : (i+1)*G] its G-1 negatives. Every other passage in the batch is
an extra (in-batch) negative. With cross-device negatives the passages of all workers are.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F

EncodeFn = Callable[[dict], torch.Tensor]  # tokenized inputs -> L2-normalized embeddings


def info_nce(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of each query against all passages; the target is its positive.

    q: [B, D], p: [B * G, D], both L2-normalized (so q @ p.T are cosines).
    """
    group = p.shape[0] // q.shape[0]
    if group * q.shape[0] != p.shape[0]:
        raise ValueError(f"{p.shape[0]} passages is not a multiple of {q.shape[0]} queries")
    scores = q @ p.T / temperature
    target = torch.arange(q.shape[0], device=q.device) * group
    return F.cross_entropy(scores, target)


def listwise_loss(logits: torch.Tensor, group: int) -> torch.Tensor:
    """The cross-encoder's listwise softmax loss (FlagEmbedding's reranker loss): logits of B
    groups, each [positive, negative_1 .. negative_{group-1}], flat [B * group]; the mean over
    groups of -log softmax(group logits)[positive]."""
    if logits.numel() % group:
        raise ValueError(f"{logits.numel()} logits is not a multiple of the group size {group}")
    grouped = logits.reshape(-1, group).float()
    return F.cross_entropy(grouped, torch.zeros(grouped.shape[0], dtype=torch.long, device=logits.device))


def gather_keep_local_grad(t: torch.Tensor) -> torch.Tensor:
    """All workers' rows, concatenated in rank order; only this worker's rows carry gradient.

    The loss is then computed over the global batch on every worker; see `cross_device_loss`.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the incoming gradient by `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.scale, None


def cross_device_loss(q: torch.Tensor, p: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE over the global batch: every worker's passages are negatives for every query.

    The value equals the single-worker loss on the combined batch. Each worker back-propagates
    only through its own rows, and DDP averages gradients over W workers, so the gradient is
    scaled by W on the way back (the value is not): the averaged gradient is then the
    single-worker one, and the logged loss is the combined batch's.
    """
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    loss = info_nce(gather_keep_local_grad(q), gather_keep_local_grad(p), temperature)
    return _ScaleGradient.apply(loss, float(world)) if world > 1 else loss


class _RngState:
    """CPU (and current CUDA device) RNG state, so a forward can be replayed with equal dropout."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_available() else None

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda)


def _chunks(inputs: dict, size: int, order: torch.Tensor) -> list[dict]:
    """Rows in `order`, `size` at a time, each chunk cut to its own longest row (right padding)."""
    out = []
    for i in range(0, len(order), size):
        idx = order[i:i + size]
        width = int(inputs["attention_mask"][idx].sum(1).max())
        out.append({k: v[idx][:, :width] if v.dim() == 2 else v[idx] for k, v in inputs.items()})
    return out


def _length_order(inputs: dict, sort: bool) -> torch.Tensor:
    n = inputs["attention_mask"].shape[0]
    if not sort:
        return torch.arange(n)
    return torch.argsort(inputs["attention_mask"].sum(1), stable=True)


def grad_cache_backward(encode: EncodeFn, q_inputs: dict, p_inputs: dict, chunk_size: int,
                        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        no_sync: Callable[[], object] | None = None,
                        sort_by_length: bool = True) -> torch.Tensor:
    """GradCache: the full-batch loss and gradients with activations for `chunk_size` rows only.

    1. Embed every chunk without autograd (recording the RNG state of each), 2. compute the loss
    over the whole batch on those embeddings and get d loss / d embedding, 3. re-embed each chunk
    with autograd under its recorded RNG state (same dropout) and back-propagate the cached
    embedding gradient through it. Parameter gradients equal those of one full-batch backward.
    `no_sync` (DDP's `model.no_sync`) defers the gradient all-reduce to the last chunk.
    `sort_by_length` groups rows of similar length into a chunk and trims each chunk's padding
    (right-padded inputs), so short passages do not pay for the longest one in the batch.
    """
    q_order, p_order = _length_order(q_inputs, sort_by_length), _length_order(p_inputs, sort_by_length)
    chunks = [("q", c) for c in _chunks(q_inputs, chunk_size, q_order)] + \
             [("p", c) for c in _chunks(p_inputs, chunk_size, p_order)]
    states, reps = [], []
    with torch.no_grad():
        for _, c in chunks:
            states.append(_RngState())
            reps.append(encode(c))
    cached = [r.detach().requires_grad_() for r in reps]
    q = torch.cat([r for (kind, _), r in zip(chunks, cached) if kind == "q"])[torch.argsort(q_order)]
    p = torch.cat([r for (kind, _), r in zip(chunks, cached) if kind == "p"])[torch.argsort(p_order)]
    loss = loss_fn(q, p)
    loss.backward()
    after = _RngState()
    for i, ((_, c), state, rep) in enumerate(zip(chunks, states, cached)):
        state.restore()
        last = i == len(chunks) - 1
        with (nullcontext() if last or no_sync is None else no_sync()):
            torch.dot(encode(c).flatten(), rep.grad.flatten()).backward()
    after.restore()  # later randomness does not depend on how many chunks there were
    return loss.detach()


def lsr_loss(q: torch.Tensor, p: torch.Tensor, lm_scores: torch.Tensor, retriever_temperature: float,
             lm_temperature: float) -> torch.Tensor:
    """LM-supervised retrieval: KL(p_LM || p_R) averaged over queries, where for query i with
    candidates i*k .. i*k+k-1 of `p`, p_R = softmax(cos(q_i, p_ij) / retriever_temperature) and
    p_LM = softmax(lm_scores[i] / lm_temperature) is a fixed target (RA-DIT's p_LSR).

    q: [B, D], p: [B * k, D] (L2-normalized), lm_scores: [B, k].
    """
    b, k = lm_scores.shape
    if p.shape[0] != b * k or q.shape[0] != b:
        raise ValueError(f"{q.shape[0]} queries, {p.shape[0]} passages and {tuple(lm_scores.shape)} LM scores "
                         "do not make groups of k candidates")
    sims = (q.unsqueeze(1) * p.reshape(b, k, -1)).sum(-1).float() / retriever_temperature
    target = torch.softmax(lm_scores.float() / lm_temperature, dim=-1)
    return F.kl_div(torch.log_softmax(sims, dim=-1), target, reduction="batchmean")


def gold_info_nce(q: torch.Tensor, p: torch.Tensor, gold_index: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE of each query whose own passage is among its candidates (gold_index >= 0) against
    every passage of the batch; 0 when no query has it."""
    group = p.shape[0] // q.shape[0]
    keep = gold_index >= 0
    if not bool(keep.any()):
        return (q.sum() + p.sum()) * 0.0  # keeps the graph (DDP expects every parameter's gradient)
    scores = q @ p.T / temperature
    target = torch.arange(q.shape[0], device=q.device) * group + gold_index.clamp(min=0)
    return F.cross_entropy(scores[keep], target[keep])
