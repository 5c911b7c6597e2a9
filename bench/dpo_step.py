"""A DPO, an ORPO and an SFT step (forward + backward, LoRA) on the same preference pairs, side
by side in one process: what preference tuning costs per token against SFT on the chosen replies.

    sft    the prompt + chosen rows of the batch, answer-only SFT loss (ray_ft/train/loss.py)
    orpo   prompt + chosen and prompt + rejected rows, one policy forward
    dpo    the same rows, the policy forward + the reference forward (adapter disabled)
    *_flat the same sequences padding-free, end to end in one row (what `data.packing` trains),
           cut per sequence by ray_ft's packed attention

Pairs are financial QA (question with its context; chosen = its answer, rejected = the answer to
another question), `--pairs` per step, tokenized with the chat template as the recipe does. Each
variant's tokens are the real (non-padding) tokens of the rows it runs: SFT runs half the rows.
Prints median seconds per step, tokens/s and pairs/s, and each one's ratio to SFT.

    .venv/bin/python bench/dpo_step.py [--model SmolLM2-135M-Instruct] [--pairs 4] [--repeats 2]
        [--rounds 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from packed_attention import time_alternating

FINQA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


def _pairs(n: int) -> list[dict]:
    with FINQA.open(newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(2 * n), csv.DictReader(f))]
    return [{"prompt": f"Context: {r['context']}\n\nQuestion: {r['question']}", "chosen": r["answer"],
             "rejected": rows[(i + n) % len(rows)]["answer"]} for i, r in enumerate(rows[:n])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    from ray_ft.config import TrainConfig
    from ray_ft.data.preference import preference_pair, tokenize_pair
    from ray_ft.models import resolve_model
    from ray_ft.train.loss import answer_only_loss
    from ray_ft.train.methods import build_model
    from ray_ft.train.preference import pair_batch, preference_loss

    torch.set_num_threads(args.threads)
    model_dir = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir)
    pairs = [preference_pair(p, f"line {i + 1}") for i, p in enumerate(_pairs(args.pairs))]
    batch = pair_batch([tokenize_pair(tok, p, "You are a helpful assistant.") for p in pairs], tok.pad_token_id)
    flat = pair_batch([tokenize_pair(tok, p, "You are a helpful assistant.") for p in pairs], tok.pad_token_id,
                      flatten=True)
    chosen = {k: v[: args.pairs] for k, v in batch.items()}
    # packed attention for the flat rows; padded batches (a 2-D mask) go to transformers' sdpa
    model, _ = build_model(model_dir, TrainConfig(precision="fp32"), torch.float32, packed=True)
    model.train()

    def step(fn):
        def run():
            loss = fn()
            loss.backward()
            model.zero_grad(set_to_none=True)
            return float(loss.detach())
        return run

    steps = {
        "sft": step(lambda: answer_only_loss(model, chosen)),
        "orpo": step(lambda: preference_loss(model, batch, "orpo", 0.1, 0.0, 0.1).loss),
        "dpo": step(lambda: preference_loss(model, batch, "dpo", 0.1, 0.0, 0.1).loss),
        "orpo_flat": step(lambda: preference_loss(model, flat, "orpo", 0.1, 0.0, 0.1).loss),
        "dpo_flat": step(lambda: preference_loss(model, flat, "dpo", 0.1, 0.0, 0.1).loss),
    }
    seconds, _ = time_alternating(steps, args.rounds, args.repeats)
    tokens = {"sft": int(chosen["attention_mask"].sum()), "orpo": int(batch["attention_mask"].sum())}
    tokens |= {name: tokens["orpo"] for name in ("dpo", "orpo_flat", "dpo_flat")}
    assert flat["input_ids"].numel() == tokens["orpo"]  # the flat row is the real tokens, no padding
    out = {name: {"s_per_step": round(s, 3), "tokens_per_s": round(tokens[name] / s, 1),
                  "pairs_per_s": round(args.pairs / s, 3)} for name, s in seconds.items()}
    for name in out:
        out[name]["tokens_per_s_vs_sft"] = round(out[name]["tokens_per_s"] / out["sft"]["tokens_per_s"], 2)
        out[name]["pairs_per_s_vs_sft"] = round(out[name]["pairs_per_s"] / out["sft"]["pairs_per_s"], 2)
    print(json.dumps({"model": args.model, "pairs": args.pairs, "threads": args.threads,
                      "row_tokens": tokens, "padded_width": batch["input_ids"].shape[1],
                      "padded_tokens": batch["input_ids"].numel(), **out}, indent=2))


if __name__ == "__main__":
    main()
