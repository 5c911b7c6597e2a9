"""What an unmerged LoRA adapter costs in vLLM's CPU build, per dtype, side by side in one run.

For each dtype: start ray_ft's VLLMGenerator (base + one rank-8 all-linear adapter), then time on
real CMRC2018 prompts (~830 tokens, 48 greedy tokens): one request, 4 concurrent requests on 4
different passages, and the same 4 again (prefix cache warm). Prints seconds and LoRA/base ratios.

    .venv/bin/python bench/vllm_cpu_lora.py [--dtypes float32 bfloat16] [--adapter DIR]

Without --adapter a random adapter (seeded, B ~ N(0, 0.05)) is written to a temp folder: the cost
does not depend on the adapter's values.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from ray_ft.config import VLLMConfig
from ray_ft.data.readers import read_qa_source
from ray_ft.data.templates import build_prompt
from ray_ft.models import resolve_model
from ray_ft.testing import make_random_lora_adapter

CMRC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cmrc2018" / "cmrc2018_dev.json"


def one_question_per_passage(n: int) -> list[list[dict]]:
    seen, out = set(), []
    for r in read_qa_source(str(CMRC)):
        if r.passage_id not in seen:
            seen.add(r.passage_id)
            out.append([{"role": "user", "content": build_prompt(r.context, r.question, "zh")}])
        if len(out) == n:
            break
    return out


async def measure(gen, model: str, prompts: list[list[dict]]) -> dict:
    async def run(batch):
        t = time.perf_counter()
        await asyncio.gather(*(gen.generate(m, model, 48, 0.0) for m in batch))
        return time.perf_counter() - t

    single = await run(prompts[:1])  # passage 0 is now cached: the batch below uses 1..4
    batch = await run(prompts[1:5])
    cached = await run(prompts[1:5])
    return {"single_s": single, "batch4_s": batch, "batch4_cached_s": cached}


async def bench_dtype(dtype: str, model_dir: Path, adapter: Path) -> dict:
    from ray_ft.serve.engines import VLLMGenerator

    t = time.perf_counter()
    gen = VLLMGenerator(str(model_dir), "base", {"lora": str(adapter)}, VLLMConfig(dtype=dtype),
                        "You are a helpful assistant.", use_gpu=False)
    start_s = time.perf_counter() - t
    prompts = one_question_per_passage(10)
    try:
        base = await measure(gen, "base", prompts[:5])
        lora = await measure(gen, "lora", prompts[5:])  # other passages: no cache shared with base
    finally:
        gen.shutdown()
    return {"dtype": dtype, "engine_start_s": start_s, "base": base, "lora": lora}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--adapter", type=Path)
    args = ap.parse_args()
    model_dir = resolve_model("SmolLM2-135M-Instruct")
    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter
        if adapter is None:
            adapter = Path(tmp) / "adapter"
            make_random_lora_adapter(model_dir, adapter, std=0.05)
        results = [asyncio.run(bench_dtype(d, model_dir, adapter)) for d in args.dtypes]
    print("\n| dtype | case | base (s) | LoRA (s) | LoRA / base |\n|---|---|---:|---:|---:|")
    for r in results:
        for case in ("single_s", "batch4_s", "batch4_cached_s"):
            b, lo = r["base"][case], r["lora"][case]
            print(f"| {r['dtype']} | {case.removesuffix('_s')} | {b:.2f} | {lo:.2f} | {lo / b:.1f}x |")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
