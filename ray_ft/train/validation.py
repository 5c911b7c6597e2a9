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
from ray_ft.metrics.qa import cmrc_f1, exact_match, origin_score


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


def greedy_answers(model, tok, prompts: list[list[int]], max_new_tokens: int, batch_size: int, device,
                   synced: bool = False) -> list[str]:
    """The greedy reply to each prompt (token ids), `batch_size` prompts per `generate` call, left
    padded: on a CPU one decode step of 16 sequences costs little more than one of a single
    sequence. Every rank calls `generate` equally often (ZeRO-3's `synced` gathers are collective)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    replies = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):], mask[j, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=pad, synced_gpus=synced)
        replies += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return replies


def validate(stepper, tok, rows: list[dict], tcfg, rank: int, world: int, device) -> dict:
    """{val_loss, val_exact_match, val_origin, val_f1} on `rows` (dicts with input_ids, labels,
    context, answers), and for the answer metrics their standard errors over the questions
    (`val_*_se`) and the number of questions (`val_questions`); identical on every rank. Runs in
    the training precision (`compute_context`)."""
    import torch

    from ray_ft.train.metrics import sum_over_ranks
    from ray_ft.train.steppers import compute_context

    model = stepper.module
    loss_rows = rows[: tcfg.val_max_examples]
    gen_rows = rows[: tcfg.val_generate_samples]
    # loss*tokens, tokens, em, origin, f1, answered, then the squares of em, origin, f1
    sums = torch.zeros(9, dtype=torch.float64)
    stepper.train(False)
    try:
        with torch.no_grad(), compute_context(tcfg, model):
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
            mine = rank_slice(len(gen_rows), rank, world) if gen_rows else []
            prompts = [prompt_part(gen_rows[i]["input_ids"], gen_rows[i]["labels"]) for i, _ in mine]
            replies = greedy_answers(model, tok, prompts, tcfg.val_max_new_tokens, tcfg.val_generate_batch_size,
                                     device, synced)
            for (i, w), answer in zip(mine, replies):
                r = gen_rows[i]
                answers = [str(a) for a in r["answers"]]
                scores = (exact_match(answer, answers), origin_score(answer, r["context"]), cmrc_f1(answer, answers))
                for k, x in enumerate(scores):
                    sums[2 + k] += w * x
                    sums[6 + k] += w * x * x
                sums[5] += w
    finally:
        stepper.train(True)
    sums = sum_over_ranks(sums, device)
    out = {"val_loss": sums[0].item() / max(sums[1].item(), 1.0)}
    n = sums[5].item()
    if n > 0:
        out["val_questions"] = int(round(n))
        for k, name in enumerate(("val_exact_match", "val_origin", "val_f1")):
            mean = sums[2 + k].item() / n
            var = max(sums[6 + k].item() / n - mean * mean, 0.0) * n / max(n - 1, 1)  # sample variance
            out[name], out[f"{name}_se"] = mean, math.sqrt(var / n)
    return out
