"""Validation during SFT: token-level loss on held-out rows and greedy-answer metrics (exact
match, origin, CMRC F1 — as in the eval stage) on a sample of them.

Every rank takes part: each scores an equal-sized strided slice and the sums are all-reduced, so
all ranks end with the same numbers (and, under ZeRO-3, run the same number of forward passes,
which gather the sharded weights collectively). Slices are padded to equal size by repeating rows
with weight 0.
"""

from __future__ import annotations

import math

from ray_ft.data.tokenize import IGNORE_INDEX
from ray_ft.eval.metrics import cmrc_f1, exact_match, origin_score


def rank_slice(n: int, rank: int, world: int) -> list[tuple[int, float]]:
    """(row index, weight) pairs of this rank: every rank gets ceil(n/world) of them; indices past
    n wrap around with weight 0 so that they count for nothing."""
    per_rank = math.ceil(n / world)
    out = []
    for k in range(per_rank):
        i = k * world + rank
        out.append((i % n, 1.0 if i < n else 0.0))
    return out


def prompt_part(input_ids: list[int], labels: list[int]) -> list[int]:
    """The tokens before the first trained (answer) token: what the model is asked."""
    for i, lab in enumerate(labels):
        if lab != IGNORE_INDEX:
            return list(input_ids[:i])
    return list(input_ids)


def validate(stepper, tok, rows: list[dict], tcfg, rank: int, world: int, device) -> dict:
    """{val_loss, val_exact_match, val_origin, val_f1} on `rows` (dicts with input_ids, labels,
    context, answers); identical on every rank."""
    import torch

    from ray_ft.train.metrics import sum_over_ranks

    model = stepper.module
    loss_rows = rows[: tcfg.val_max_examples]
    gen_rows = rows[: tcfg.val_generate_samples]
    sums = torch.zeros(6, dtype=torch.float64)  # loss*tokens, tokens, em, origin, f1, answered
    stepper.train(False)
    try:
        with torch.no_grad():
            for i, w in rank_slice(len(loss_rows), rank, world):
                r = loss_rows[i]
                ids = torch.tensor([r["input_ids"]], device=device)
                labels = torch.tensor([r["labels"]], device=device)
                loss = model(input_ids=ids, labels=labels, use_cache=False).loss.float().item()
                # The model averages over the shifted labels: all but a leading ignored position.
                n_tok = sum(1 for x in r["labels"][1:] if x != IGNORE_INDEX)
                sums[0] += w * loss * n_tok
                sums[1] += w * n_tok
            synced = world > 1 and getattr(stepper, "stage", 0) == 3
            for i, w in rank_slice(len(gen_rows), rank, world) if gen_rows else []:
                r = gen_rows[i]
                prompt = torch.tensor([prompt_part(r["input_ids"], r["labels"])], device=device)
                out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                                     max_new_tokens=tcfg.val_max_new_tokens, do_sample=False,
                                     pad_token_id=tok.pad_token_id or tok.eos_token_id,
                                     synced_gpus=synced)
                answer = tok.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
                answers = [str(a) for a in r["answers"]]
                sums[2] += w * exact_match(answer, answers)
                sums[3] += w * origin_score(answer, r["context"])
                sums[4] += w * cmrc_f1(answer, answers)
                sums[5] += w
    finally:
        stepper.train(True)
    sums = sum_over_ranks(sums, device)
    out = {"val_loss": sums[0].item() / max(sums[1].item(), 1.0)}
    if sums[5] > 0:
        out.update(val_exact_match=sums[2].item() / sums[5].item(), val_origin=sums[3].item() / sums[5].item(),
                   val_f1=sums[4].item() / sums[5].item())
    return out
