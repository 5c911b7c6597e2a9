"""One packed LoRA SFT step (forward + backward), side by side in one process: what each of the
trainer's step optimisations is worth, on the model and row shape of the whole-split CMRC run.

    fp32                      fp32 weights, the model's own loss (logits at every position)
    fp32_answer_only          + logits only where a label is trained (ray_ft/train/loss.py)
    bf16_cast                 bf16 base, fp32 adapters, peft casting each adapter's input to fp32,
                              the model's own loss (ray_ft's bf16 before this stop)
    bf16_autocast_answer_only bf16 base, fp32 adapters under bf16 autocast, answer-only logits
                              (ray_ft's bf16 now)

The row packs `--examples` examples of `--example-len` tokens, each ending in `--answer-len`
trained tokens (CMRC2018 answers with the end-of-turn tokens). The variants alternate so drift
hits all; prints median seconds per step, tokens/s and the ratio to fp32. `--profile NAME` prints
the torch profiler's top operators of one step of that variant.

    .venv/bin/python bench/sft_step.py [--model SmolLM2-135M-Instruct] [--examples 4]
        [--example-len 512] [--answer-len 12] [--repeats 2] [--rounds 2] [--threads 2] [--profile VARIANT]
"""

from __future__ import annotations

import argparse
import contextlib
import json

from packed_attention import time_alternating


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--examples", type=int, default=4)
    ap.add_argument("--example-len", type=int, default=512)
    ap.add_argument("--answer-len", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--profile", choices=["fp32", "fp32_answer_only", "bf16_cast", "bf16_autocast_answer_only"])
    args = ap.parse_args()

    import torch

    from ray_ft.config import TrainConfig
    from ray_ft.models import resolve_model
    from ray_ft.train.loss import answer_only_loss, model_loss
    from ray_ft.train.methods import build_model
    from ray_ft.train.steppers import compute_context

    torch.set_num_threads(args.threads)
    model_dir = str(resolve_model(args.model))
    n = args.examples * args.example_len
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (1, n), generator=g)
    pos = torch.arange(args.example_len).repeat(args.examples).unsqueeze(0)
    labels = torch.full((1, n), -100)
    for e in range(1, args.examples + 1):
        end = e * args.example_len
        labels[0, end - args.answer_len:end] = ids[0, end - args.answer_len:end]
    inputs = {"input_ids": ids, "position_ids": pos, "labels": labels, "use_cache": False,
              "num_items_in_batch": (labels[:, 1:] != -100).sum()}

    fp32_cfg, bf16_cfg = TrainConfig(precision="fp32"), TrainConfig(precision="bf16")
    fp32_model, _ = build_model(model_dir, fp32_cfg, torch.float32, packed=True)
    bf16_model, _ = build_model(model_dir, bf16_cfg, torch.bfloat16, packed=True)

    def step_with(model, loss_of, context):
        def step() -> float:
            model.zero_grad()
            with context():
                loss = loss_of(model, inputs)
            loss.backward()
            return loss.item()
        return step

    variants = {
        "fp32": step_with(fp32_model, model_loss, contextlib.nullcontext),
        "fp32_answer_only": step_with(fp32_model, answer_only_loss, contextlib.nullcontext),
        "bf16_cast": step_with(bf16_model, model_loss, contextlib.nullcontext),
        "bf16_autocast_answer_only": step_with(bf16_model, answer_only_loss,
                                               lambda: compute_context(bf16_cfg, bf16_model)),
    }
    secs, losses = time_alternating(variants, args.rounds, args.repeats)
    print(json.dumps({
        "model": args.model, "row_tokens": n, "examples": args.examples, "trained_tokens": int(inputs["num_items_in_batch"]),
        "threads": args.threads,
        **{name: {"s_per_step": round(s, 3), "tokens_per_s": round(n / s, 1), "vs_fp32": round(secs["fp32"] / s, 2),
                  "loss": round(losses[name], 5)} for name, s in secs.items()},
    }, indent=1))
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            variants[args.profile]()
        print(f"profile of one {args.profile} step:")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
