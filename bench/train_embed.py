"""Embedder training and encoding speed, and peak memory vs batch size with and without GradCache.

One training step = B queries + B * G passages of real Financial-QA-10k triplets through
all-MiniLM-L6-v2 (InfoNCE, temperature 0.02, AdamW). Each configuration runs in its own process
so its peak RSS (`ru_maxrss`) is its own; the same steps are timed for plain full-batch
backward and for GradCache (length-sorted chunks of `--chunk` texts).

    .venv/bin/python bench/train_embed.py [--batch-sizes 8 16 32 64] [--group 4] [--chunk 16] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

FINQA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


def one_config(batch: int, group: int, chunk: int | None, steps: int, threads: int) -> dict:
    import torch
    from transformers import AutoTokenizer

    from ray_ft.data.triplets import build_triplets, read_qa_csv
    from ray_ft.models import resolve_model
    from ray_ft.train.contrastive import grad_cache_backward, info_nce
    from ray_ft.train.embed import SentenceEncoder, group_passages

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model_dir = str(resolve_model("all-MiniLM-L6-v2"))
    pairs, _ = read_qa_csv(FINQA, on_error="skip")
    trips = build_triplets(pairs[: batch * (steps + 1) * 2], neg_num=10, seed=1314)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = SentenceEncoder.build(model_dir, "mean").train()
    optim = torch.optim.AdamW(model.parameters(), lr=2e-5)
    rng = random.Random(0)
    loss_fn = lambda q, p: info_nce(q, p, 0.02)  # noqa: E731

    def enc(texts, n):
        return dict(tok(texts, padding=True, truncation=True, max_length=n, return_tensors="pt"))

    times = []
    for step in range(steps + 1):  # step 0 warms up
        rows = trips[step * batch:(step + 1) * batch]
        b = {"pos": [t["pos"] for t in rows], "neg": [t["neg"] for t in rows]}
        q_in = enc([t["query"] for t in rows], 64)
        p_in = enc(group_passages(b, group, rng), 256)
        t0 = time.perf_counter()
        if chunk:
            grad_cache_backward(model, q_in, p_in, chunk, loss_fn)
        else:
            loss_fn(model(q_in), model(p_in)).backward()
        optim.step()
        optim.zero_grad(set_to_none=True)
        if step:
            times.append(time.perf_counter() - t0)
    sentences = batch * (1 + group)
    # Encoding (inference) throughput on the same passages.
    model.eval()
    texts = [t["pos"][0] for t in trips[: 256]]
    with torch.no_grad():
        t0 = time.perf_counter()
        for i in range(0, len(texts), 64):
            model(enc(texts[i:i + 64], 256))
        encode_s = time.perf_counter() - t0
    return {"batch": batch, "group": group, "grad_cache_chunk": chunk,
            "train_sentences_per_s": sentences / (sum(times) / len(times)),
            "step_s": sum(times) / len(times), "encode_sentences_per_s": len(texts) / encode_s,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_config(**json.loads(args.one))))
        return
    print("| queries/step | passages/step | GradCache chunk | train sentences/s | step (s) | "
          "encode sentences/s | peak RSS (MB) |\n|---:|---:|---:|---:|---:|---:|---:|")
    for batch in args.batch_sizes:
        for chunk in (None, args.chunk):
            spec = json.dumps({"batch": batch, "group": args.group, "chunk": chunk,
                               "steps": args.steps, "threads": args.threads})
            out = subprocess.run([sys.executable, __file__, "--one", spec], capture_output=True,
                                 text=True, check=True).stdout.strip().splitlines()[-1]
            r = json.loads(out)
            print(f"| {batch} | {batch * args.group} | {chunk or '—'} | {r['train_sentences_per_s']:.1f} | "
                  f"{r['step_s']:.2f} | {r['encode_sentences_per_s']:.1f} | {r['peak_rss_mb']:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
