"""One packed training row, forward + backward: transformers' "sdpa" (one SDPA call over the whole
row with the block-diagonal mask it builds from the position ids) vs ray_ft's packed attention
(causal SDPA per example, `ray_ft/train/attention.py`). Same model, row, threads; the two
alternate so drift hits both. Prints seconds per step, their ratio, and the loss / gradient
difference between the two (they compute the same function).

With `--rows R` (R > 1) it compares instead what a batch of R packed rows costs under ray_ft's
packed attention padded to the longest row (each pad its own segment) vs flattened into one row
(`ray_ft/train/batches.py`); row r holds `--examples` examples and is `--row-fill` shorter per
row (the padding a batch of packed rows needs).

    .venv/bin/python bench/packed_attention.py [--model SmolLM2-135M-Instruct] [--examples 2]
        [--example-len 1024] [--repeats 3] [--threads 2] [--rows 1] [--row-fill 0.06]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def load_model(name: str, threads: int, attn: str | None = None):
    import torch
    from transformers import AutoModelForCausalLM

    from ray_ft.models import resolve_model

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(name)), dtype=torch.float32,
                                                 attn_implementation=attn)
    return model.train()


def time_alternating(steps: dict, rounds: int, repeats: int) -> tuple[dict, dict]:
    """Run each `steps[name]()` once untimed (warm-up; its result is kept) then `repeats` timed
    times, name after name, for `rounds` rounds, so that drift hits all. Returns (median seconds
    per step, the last warm-up result) by name."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    results = {}
    for _ in range(rounds):
        for name, step in steps.items():
            results[name] = step()
            for _ in range(repeats):
                t0 = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--examples", type=int, default=2, help="examples packed into the row")
    ap.add_argument("--example-len", type=int, default=1024, help="tokens per example")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per implementation and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="> 1: padded batch of packed rows vs flattened")
    ap.add_argument("--row-fill", type=float, default=0.06, help="each next row is this much shorter")
    args = ap.parse_args()
    if args.rows > 1:
        return compare_flattening(args)

    import torch

    from ray_ft.train.attention import register_packed_sdpa

    packed = register_packed_sdpa()
    model = load_model(args.model, args.threads)
    g = torch.Generator().manual_seed(0)
    n = args.examples * args.example_len
    ids = torch.randint(100, model.config.vocab_size, (1, n), generator=g)
    pos = torch.arange(args.example_len).repeat(args.examples).unsqueeze(0)

    def step_with(impl: str):
        def step() -> tuple[float, torch.Tensor]:
            model.config._attn_implementation = impl
            model.zero_grad()
            out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
            out.loss.backward()
            return out.loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()
        return step

    secs, checks = time_alternating({impl: step_with(impl) for impl in ("sdpa", packed)}, args.rounds, args.repeats)
    sdpa_s, packed_s = secs["sdpa"], secs[packed]
    print(json.dumps({
        "model": args.model, "row_tokens": n, "examples": args.examples, "threads": args.threads,
        "sdpa_block_mask_s_per_step": round(sdpa_s, 3), "packed_sdpa_s_per_step": round(packed_s, 3),
        "speedup": round(sdpa_s / packed_s, 2),
        "loss_abs_diff": abs(checks["sdpa"][0] - checks[packed][0]),
        "grad_max_abs_diff": float((checks["sdpa"][1] - checks[packed][1]).abs().max()),
    }))


def compare_flattening(args) -> None:
    import numpy as np

    from ray_ft.train.attention import register_packed_sdpa
    from ray_ft.train.batches import pad_collate

    model = load_model(args.model, args.threads, register_packed_sdpa())
    g = np.random.default_rng(0)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for r in range(args.rows):
        n = int(args.example_len * (1 - args.row_fill * r))  # later rows are shorter
        ids = g.integers(100, model.config.vocab_size, args.examples * n).tolist()
        pos = list(range(n)) * args.examples
        batch["input_ids"].append(ids)
        batch["labels"].append([-100 if p == 0 else t for t, p in zip(ids, pos)])  # as pack_table does
        batch["position_ids"].append(pos)
    batch = {k: np.array(v, dtype=object) for k, v in batch.items()}
    inputs = {"padded": pad_collate(batch, pad_id=0), "flattened": pad_collate(batch, pad_id=0, flatten=True)}

    def step_with(x: dict):
        def step() -> float:
            model.zero_grad()
            out = model(input_ids=x["input_ids"], position_ids=x["position_ids"], labels=x["labels"], use_cache=False)
            out.loss.backward()
            return out.loss.item()
        return step

    secs, losses = time_alternating({name: step_with(x) for name, x in inputs.items()}, args.rounds, args.repeats)
    padded_s, flat_s = secs["padded"], secs["flattened"]
    print(json.dumps({
        "model": args.model, "rows": args.rows, "real_tokens": int(inputs["flattened"]["num_real_tokens"]),
        "threads": args.threads, "padded_slots": inputs["padded"]["input_ids"].numel(),
        "padded_rows_s_per_step": round(padded_s, 3), "flattened_s_per_step": round(flat_s, 3),
        "speedup": round(padded_s / flat_s, 2), "loss_abs_diff": abs(losses["padded"] - losses["flattened"]),
    }))


if __name__ == "__main__":
    main()
