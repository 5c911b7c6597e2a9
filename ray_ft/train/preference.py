"""Preference objectives: DPO (against a frozen reference) and ORPO (no reference).

A preference batch holds each pair as two rows, chosen then rejected, sharing the prompt: rows
[0, n) are the chosen completions of pairs 0..n-1 and rows [n, 2n) the rejected ones, with the
prompt masked in `labels` (-100), as SFT masks it. A padding-free batch (`pair_batch(...,
flatten=True)`, for `data.packing`) puts the same 2n sequences end to end in one row instead:
position ids restart per sequence (the packed attention cuts the row there, as for packed SFT),
and `segments` names the sequence of each position, so the log-probs are summed per sequence.

    DPO   logits_i = beta * ((log pi(c_i) - log ref(c_i)) - (log pi(r_i) - log ref(r_i)))
          loss     = mean_i[ -(1 - eps) * log sigmoid(logits_i) - eps * log sigmoid(-logits_i) ]
          (Rafailov et al. 2023; eps > 0 is the label-smoothed "conservative" DPO)
    ORPO  loss     = mean_i[ NLL(c_i) - lambda * log sigmoid(log odds(c_i) - log odds(r_i)) ]
          with odds(y) = p / (1 - p), p = exp(mean token log-prob of y) (Hong et al. 2024)

log pi(y) is the sum of the completion's token log-probs. For LoRA the reference is the same
model with its adapter disabled (peft's `disable_adapter()`), so DPO holds no second copy of the
weights; the rewards beta * (log pi - log ref) are what validation reports.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_ft.data.tokenize import IGNORE_INDEX


@dataclass(frozen=True)
class PreferenceOutput:
    """One batch's loss and, per pair, the implicit rewards (DPO) or log odds (ORPO)."""

    loss: object  # scalar tensor: the mean of pair_losses
    chosen_rewards: object  # [pairs]
    rejected_rewards: object  # [pairs]
    pair_losses: object  # [pairs], detached

    @property
    def accuracy(self) -> float:
        return float((self.chosen_rewards > self.rejected_rewards).float().mean())

    @property
    def margin(self) -> float:
        return float((self.chosen_rewards - self.rejected_rewards).mean())


def token_logps(logits, targets):
    """Per row: the summed log-probs of the `targets` tokens (IGNORE_INDEX: not counted) under
    `logits` [rows, n, vocab] (logits[:, t] predicts targets[:, t]), and how many count. logsumexp
    instead of a log_softmax: the [rows, n, vocab] result is never materialised."""
    import torch

    mask = targets != IGNORE_INDEX
    logits = logits.float()
    token = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (token * mask).sum(-1), mask.sum(-1)


def completion_logps(logits, labels):
    """Per row: the sum of the log-probs of the labelled tokens and how many there are.
    `logits` [rows, len, vocab] predict position t+1 from t; `labels` [rows, len]."""
    return token_logps(logits[:, :-1], labels[:, 1:])


def sequence_logps(model, inputs: dict, trained_only: bool | None = None):
    """(sum of completion log-probs, completion tokens) per sequence of a preference batch.
    `trained_only`: ask the model for the logits of the completion positions only (transformers'
    `logits_to_keep`, as the SFT loss does: the head and softmax skip the prompt); None: when the
    model supports it (a DDP wrapper hides that: decide on the bare model and pass it)."""
    from ray_ft.train.loss import supports_logits_to_keep, trained_positions

    labels = inputs["labels"]
    forward = {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask", "position_ids")}
    if trained_only is None:
        trained_only = supports_logits_to_keep(model)
    segments = inputs.get("segments")
    if not trained_only:
        logits, targets, owner = model(**forward).logits[:, :-1], labels[:, 1:], None
        if segments is not None:
            owner = segments[1:]
    else:
        positions = trained_positions(labels)
        logits = model(**forward, logits_to_keep=positions).logits
        targets = labels[:, positions + 1]
        owner = None if segments is None else segments[positions + 1]
    if segments is None:
        return token_logps(logits, targets)
    return _per_segment(logits[0], targets[0], owner, int(segments[-1]) + 1)


def _per_segment(logits, targets, owner, n: int):
    """token_logps of one flattened row [len, vocab], summed per sequence (`owner` [len]: the
    sequence of each target) into [n] tensors."""
    import torch

    logps, _ = token_logps(logits[:, None], targets[:, None])  # every position a row of one token
    counted = (targets != IGNORE_INDEX).long()
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(n, dtype=counted.dtype, device=counted.device).index_add(0, owner, counted)
    return sums, counts


def reference_logps(model, inputs: dict, trained_only: bool | None = None):
    """The reference's completion log-probs: the LoRA model with its adapter switched off."""
    import torch

    if not hasattr(model, "disable_adapter"):
        raise ValueError("DPO's reference is the base model with the adapter disabled: train.finetuning_type "
                         "must be lora")
    with torch.no_grad(), model.disable_adapter():
        return sequence_logps(model, inputs, trained_only)[0]


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float,
             label_smoothing: float = 0.0) -> PreferenceOutput:
    """DPO over per-pair summed log-probs (tensors [pairs])."""
    import torch.nn.functional as F

    chosen = beta * (policy_chosen - ref_chosen)
    rejected = beta * (policy_rejected - ref_rejected)
    logits = chosen - rejected
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return PreferenceOutput(losses.mean(), chosen.detach(), rejected.detach(), losses.detach())


def orpo_loss(chosen_logps, chosen_tokens, rejected_logps, rejected_tokens, lam: float) -> PreferenceOutput:
    """ORPO over per-pair summed log-probs and token counts (tensors [pairs])."""
    import torch
    import torch.nn.functional as F

    mean_c = chosen_logps / chosen_tokens
    mean_r = rejected_logps / rejected_tokens
    # log(p / (1 - p)) for p = exp(mean): log1p(-exp(x)) is exact for x near 0
    log_odds_c = mean_c - torch.log1p(-torch.exp(mean_c))
    log_odds_r = mean_r - torch.log1p(-torch.exp(mean_r))
    losses = -mean_c - lam * F.logsigmoid(log_odds_c - log_odds_r)
    return PreferenceOutput(losses.mean(), log_odds_c.detach(), log_odds_r.detach(), losses.detach())


def preference_loss(model, inputs: dict, method: str, beta: float, label_smoothing: float,
                    orpo_lambda: float, reference=None, trained_only: bool | None = None) -> PreferenceOutput:
    """The objective of `method` ("dpo" | "orpo") for a batch of 2n rows (chosen, then rejected).
    `model` may be a DDP/DeepSpeed wrapper; `reference` is the bare peft model whose adapter is
    switched off for DPO's reference pass (default: `model` itself); `trained_only` as in
    `sequence_logps`."""
    ref = None if method == "orpo" else reference_logps(reference if reference is not None else model, inputs,
                                                        trained_only)
    logps, tokens = sequence_logps(model, inputs, trained_only)
    n = logps.shape[0] // 2
    if method == "orpo":
        return orpo_loss(logps[:n], tokens[:n], logps[n:], tokens[n:], orpo_lambda)
    return dpo_loss(logps[:n], logps[n:], ref[:n], ref[n:], beta, label_smoothing)


def pair_batch(rows: list[dict], pad_id: int, flatten: bool = False) -> dict:
    """A preference batch from tokenized pairs ({prompt_ids, chosen_ids, rejected_ids}): every
    pair's prompt + chosen, then every pair's prompt + rejected, prompt masked; right-padded rows,
    or (`flatten`) one row with position ids restarting per sequence and `segments`."""
    import torch

    seqs = [(r["prompt_ids"], r[key]) for key in ("chosen_ids", "rejected_ids") for r in rows]
    if flatten:
        return _flat_pairs(seqs)
    width = max(len(p) + len(c) for p, c in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids[i, :n] = torch.tensor([*p, *c])
        labels[i, len(p):n] = torch.tensor(c)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _flat_pairs(seqs: list[tuple]) -> dict:
    """The sequences end to end in one row [1, total]: no padding. Each sequence starts with its
    (masked) prompt, so no sequence's first token is a target of the one before."""
    import torch

    ids, labels, positions, segments = [], [], [], []
    for i, (p, c) in enumerate(seqs):
        n = len(p) + len(c)
        ids += [*p, *c]
        labels += [IGNORE_INDEX] * len(p) + list(c)
        positions += range(n)
        segments += [i] * n
    as_row = lambda x: torch.tensor(x, dtype=torch.long)[None]  # noqa: E731
    return {"input_ids": as_row(ids), "labels": as_row(labels), "position_ids": as_row(positions),
            "segments": torch.tensor(segments, dtype=torch.long)}
