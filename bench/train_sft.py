"""SFT training speed, side by side in one run on the same model and data:

1. ray_ft (Ray Train worker, padded batches) vs a plain single-process Hugging Face `Trainer` + peft
   on exactly the same rows in the same order, same LoRA, optimizer, precision and threads:
   the overhead of ray_ft's trainer (Ray Data ingest, metrics, checkpoint plumbing).
2. ray_ft with packing (rows of up to `--cutoff` tokens, per-example attention) vs padding:
   real (non-padding) tokens per second.

Steady state = real tokens / wall time summed over the steps after `--warmup`; each step's time
runs from the end of the previous step, so data loading counts on both sides. The data is the
first passages of CMRC2018 dev, prepared by ray_ft's own prepare stage (Ray Data).

3. With `--precision`: ray_ft's trainer on packed rows in fp32 and in bf16 (same data, order and
   adapter init): real tokens/s of each and how far bf16's per-step losses are from fp32's. What
   bf16 does to answer quality is bench/sft_quality.py's (dev questions, paired).

    .venv/bin/python bench/train_sft.py [--model SmolLM2-135M-Instruct] [--samples 48] [--batch 4]
                                        [--steps 6] [--warmup 2] [--cutoff 2048] [--threads 2]
                                        [--packed-batch 1] [--gradient-checkpointing] [--skip-hf]
    .venv/bin/python bench/train_sft.py --precision [--samples 96] [--steps 12] [--cutoff 512]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CMRC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cmrc2018" / "cmrc2018_dev.json"


def steady_tokens_per_s(history: list[dict], warmup: int) -> float:
    rows = [h for h in history if h["step"] > warmup]
    tokens = sum(h["tokens_per_s"] * h["step_time_s"] for h in rows)
    return tokens / sum(h["step_time_s"] for h in rows)


def hf_baseline(args) -> dict:
    """The plain baseline, in its own process: HF Trainer + peft, sequential order, no Ray."""
    import pyarrow.parquet as pq
    import torch
    from peft import LoraConfig, get_peft_model
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(args.threads)
    torch.manual_seed(42)
    rows = pq.read_table(args.shards).to_pylist()  # the same files ray_ft reads, in the same order
    tok = AutoTokenizer.from_pretrained(args.model_dir)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))

    def collate(batch):
        width = max(len(r["input_ids"]) for r in batch)
        ids = torch.full((len(batch), width), pad)
        labels = torch.full((len(batch), width), -100)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, r in enumerate(batch):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    class InOrder(Trainer):
        def _get_train_sampler(self, *a, **k):
            return SequentialSampler(self.train_dataset)

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            ends.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, per_device_train_batch_size=args.batch, max_steps=args.steps, learning_rate=3e-4,
            lr_scheduler_type="constant", max_grad_norm=1.0, use_cpu=True, save_strategy="no", report_to=[],
            logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
            seed=42)
        InOrder(model=model, args=targs, train_dataset=rows, data_collator=collate, callbacks=[Clock()]).train()
    history = []
    for k in range(args.steps):
        batch = rows[k * args.batch:(k + 1) * args.batch]
        dt = ends[k + 1] - ends[k]
        history.append({"step": k + 1, "step_time_s": dt, "tokens_per_s": sum(len(r["input_ids"]) for r in batch) / dt})
    import resource

    return {"tokens_per_s": steady_tokens_per_s(history, args.warmup), "history": history,
            "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def ray_ft_run(cfg, prepared, model_dir: Path, out: Path, warmup: int) -> dict:
    from ray_ft.train.sft import run_training

    result = run_training(cfg, prepared, model_dir, out)
    h = result.history
    return {"tokens_per_s": steady_tokens_per_s(h, warmup),
            "padding_ratio": sum(x["padding_ratio"] for x in h[warmup:]) / len(h[warmup:]),
            "peak_mem_mb": max(x["peak_mem_mb"] for x in h),
            "data_wait_s": sum(x["data_wait_s"] for x in h[warmup:]) / len(h[warmup:]), "history": h}


def hf_subprocess(args, shards: Path, model_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--hf-baseline", "--shards", str(shards), "--model-dir",
                          str(model_dir), "--batch", str(args.batch), "--steps", str(args.steps), "--warmup",
                          str(args.warmup), "--threads", str(args.threads)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare_precision(args, model_dir: Path, work: Path) -> None:
    """fp32 vs bf16 on the same packed rows, order and adapter init: speed and per-step losses.
    (Whether bf16 costs answer quality is measured on dev questions by bench/sft_quality.py.)"""
    import numpy as np

    from ray_ft.config import parse_job
    from ray_ft.data.prepare import prepare

    data = None
    results = {}
    for precision in ("fp32", "bf16"):
        cfg = parse_job({
            "name": f"bench_{precision}", "output_dir": str(work), "model": {"name": str(model_dir)},
            "data": {"source": str(CMRC), "max_samples": args.samples, "cutoff_len": args.cutoff,
                     "packing": True, "packing_len": max(2048, args.cutoff), "num_shards": 1},
            "train": {"max_steps": args.steps, "per_device_train_batch_size": args.packed_batch,
                      "learning_rate": 3e-4, "lr_scheduler_type": "constant", "cpus_per_worker": args.threads,
                      "precision": precision, "tensorboard": False},
        })
        data = data or prepare(cfg, work / "data")  # one prepared set: the same rows in the same order
        results[precision] = ray_ft_run(cfg, data, model_dir, work / cfg.name / "train", args.warmup)
    loss = {name: np.array([h["loss"] for h in r["history"]]) for name, r in results.items()}
    gap = np.abs(loss["bf16"] - loss["fp32"]) / loss["fp32"]
    half = len(gap) // 2
    print(f"\nmodel {args.model}, {args.samples} CMRC2018 examples, cutoff {args.cutoff}, packed rows of "
          f"{max(2048, args.cutoff)}, batch {args.packed_batch}, LoRA r8 all-linear, lr 3e-4 constant, {args.steps} steps, "
          f"{args.threads} threads")
    print("| run | real tokens/s | mean loss, first half | mean loss, second half | peak RSS MB |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['tokens_per_s']:.1f} | {loss[name][:half].mean():.4f} | {loss[name][half:].mean():.4f} "
              f"| {r['peak_mem_mb']:.0f} |")
    print(f"\nbf16 / fp32 real tokens/s: {results['bf16']['tokens_per_s'] / results['fp32']['tokens_per_s']:.2f}x")
    print(f"per-step |bf16 - fp32| / fp32 loss: step 1 {100 * gap[0]:.1f}%, steps 2-{half} {100 * gap[1:half].mean():.1f}%, "
          f"steps {half + 1}-{len(gap)} {100 * gap[half:].mean():.1f}% (mean)")
    print("per-step losses: " + json.dumps({k: [round(x, 4) for x in v] for k, v in loss.items()}))
    (work / "bench_precision.json").write_text(json.dumps(results, indent=2))
    print(f"details: {work / 'bench_precision.json'}")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--cutoff", type=int, default=2048)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--packed-batch", type=int, default=1, help="packed rows per step")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both ray_ft runs (memory of larger batches)")
    p.add_argument("--skip-hf", action="store_true", help="only packing vs padding (no HF Trainer baseline)")
    p.add_argument("--precision", action="store_true", help="fp32 vs bf16 in ray_ft's trainer (packed rows)")
    p.add_argument("--hf-baseline", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--shards", help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.hf_baseline:
        print(json.dumps(hf_baseline(args)))
        return

    import ray

    from ray_ft.config import parse_job
    from ray_ft.data.prepare import prepare
    from ray_ft.models import resolve_model

    model_dir = resolve_model(args.model)
    ray.init(num_cpus=4, include_dashboard=False)
    work = Path(tempfile.mkdtemp(prefix="bench_sft_"))
    if args.precision:
        return compare_precision(args, model_dir, work)
    results = {}
    for packing in (False, True):
        cfg = parse_job({
            "name": f"bench_{'packed' if packing else 'padded'}", "output_dir": str(work),
            "model": {"name": str(model_dir)},
            "data": {"source": str(CMRC), "max_samples": args.samples, "cutoff_len": args.cutoff,
                     "packing": packing, "num_shards": 1},
            "train": {"max_steps": args.steps, "per_device_train_batch_size": args.packed_batch if packing else args.batch,
                      "gradient_checkpointing": args.gradient_checkpointing, "learning_rate": 3e-4, "lr_scheduler_type": "constant", "cpus_per_worker": args.threads,
                      "precision": "fp32", "tensorboard": False},  # as the HF baseline
        })
        prepared = prepare(cfg, work / cfg.name / "data")
        results["packed" if packing else "padded"] = ray_ft_run(cfg, prepared, model_dir, work / cfg.name / "train",
                                                                args.warmup)
        if not packing:
            shards = prepared.train_dir
    if not args.skip_hf:
        # The baseline twice: beside the (idle) local Ray cluster, then alone. On a 2-core machine
        # Ray's own processes take CPU from a 2-thread torch step; the first number isolates that
        # effect from ray_ft's trainer.
        results["hf_trainer_ray_up"] = hf_subprocess(args, shards, model_dir)
        ray.shutdown()
        results["hf_trainer"] = hf_subprocess(args, shards, model_dir)

    ours, packed = results["padded"], results["packed"]
    print(f"\nmodel {args.model}, {args.samples} CMRC2018 examples, LoRA r8 all-linear, fp32, {args.threads} threads, "
          f"gradient checkpointing {args.gradient_checkpointing}, steps {args.warmup + 1}..{args.steps}")
    print("| run | real tokens/s | padding ratio | data wait s/step | peak RSS MB |")
    print("|---|---|---|---|---|")
    if not args.skip_hf:
        base, ray_up = results["hf_trainer"], results["hf_trainer_ray_up"]
        print(f"| HF Trainer + peft, padded batch {args.batch} (alone) | {base['tokens_per_s']:.1f} | | | {base['peak_mem_mb']:.0f} |")
        print(f"| HF Trainer + peft, padded batch {args.batch} (idle Ray cluster up) | {ray_up['tokens_per_s']:.1f} | | "
              f"| {ray_up['peak_mem_mb']:.0f} |")
    for name, r in ((f"ray_ft, padded batch {args.batch}", ours),
                    (f"ray_ft, packed rows of <= {args.cutoff}, batch {args.packed_batch}", packed)):
        print(f"| {name} | {r['tokens_per_s']:.1f} | {r['padding_ratio']:.3f} | {r['data_wait_s']:.3f} "
              f"| {r['peak_mem_mb']:.0f} |")
    if not args.skip_hf:
        print(f"\nray_ft / HF Trainer alone (same batches): {ours['tokens_per_s'] / base['tokens_per_s']:.3f}x "
              f"(overhead {100 * (1 - ours['tokens_per_s'] / base['tokens_per_s']):+.1f}%)")
        print(f"ray_ft / HF Trainer beside Ray: {ours['tokens_per_s'] / ray_up['tokens_per_s']:.3f}x")
    print(f"packing / padding (real tokens/s): {packed['tokens_per_s'] / ours['tokens_per_s']:.2f}x")
    (work / "bench_train_sft.json").write_text(json.dumps(results, indent=2))
    print(f"details: {work / 'bench_train_sft.json'}")


if __name__ == "__main__":
    main()
