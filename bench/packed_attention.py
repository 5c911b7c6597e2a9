"""One packed training row, forward + backward: transformers' "sdpa" (one SDPA call over the whole
row with the block-diagonal mask it builds from the position ids) vs ray_ft's packed attention
(causal SDPA per example, `ray_ft/train/attention.py`). Same model, row, threads; the two
alternate so drift hits both. Prints seconds per step, their ratio, and the loss / gradient
difference between the two (they compute the same function).

    .venv/bin/python bench/packed_attention.py [--model SmolLM2-135M-Instruct] [--examples 2]
        [--example-len 1024] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--examples", type=int, default=2, help="examples packed into the row")
    ap.add_argument("--example-len", type=int, default=1024, help="tokens per example")
    ap.add_argument("--repeats", type=int, default=3, help="timed steps per implementation and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from ray_ft.models import resolve_model
    from ray_ft.train.attention import register_packed_sdpa

    torch.set_num_threads(args.threads)
    packed = register_packed_sdpa()
    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(args.model)), dtype=torch.float32)
    model.train()
    g = torch.Generator().manual_seed(0)
    n = args.examples * args.example_len
    ids = torch.randint(100, model.config.vocab_size, (1, n), generator=g)
    pos = torch.arange(args.example_len).repeat(args.examples).unsqueeze(0)

    def step() -> tuple[float, torch.Tensor]:
        model.zero_grad()
        out = model(input_ids=ids, position_ids=pos, labels=ids, use_cache=False)
        out.loss.backward()
        return out.loss.item(), model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    times: dict[str, list[float]] = {"sdpa": [], packed: []}
    checks = {}
    for _ in range(args.rounds):
        for impl in times:
            model.config._attn_implementation = impl
            checks[impl] = step()  # warm-up, and the loss / gradient to compare
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                step()
                times[impl].append(time.perf_counter() - t0)
    sdpa_s, packed_s = statistics.median(times["sdpa"]), statistics.median(times[packed])
    print(json.dumps({
        "model": args.model, "row_tokens": n, "examples": args.examples, "threads": args.threads,
        "sdpa_block_mask_s_per_step": round(sdpa_s, 3), "packed_sdpa_s_per_step": round(packed_s, 3),
        "speedup": round(sdpa_s / packed_s, 2),
        "loss_abs_diff": abs(checks["sdpa"][0] - checks[packed][0]),
        "grad_max_abs_diff": float((checks["sdpa"][1] - checks[packed][1]).abs().max()),
    }))


if __name__ == "__main__":
    main()
