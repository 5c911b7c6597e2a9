"""Rows/s and tokens/s of the prepare stage's Ray Data pipeline vs a plain single-process loop.

Same input, same work, one run: CMRC2018 dev training questions (repeated `--repeat` times with
distinct ids, for a larger workload) -> prompt template -> chat-template tokenization with the
prompt masked -> cutoff_len fitting (context shortened around the answer) -> seeded order ->
packing (optional) -> parquet shards. The plain loop is `ExampleBuilder` in a Python for-loop and
pyarrow writes; the pipeline is `ray_ft.data.shards.write_train_set` with 1 and 2 build actors.
Both must produce the same rows (checked). Times cover the whole train-set stage, actor start-up
included (Ray itself is started before the clock), and, apart, its build phase (template +
tokenize + fit: the part the actors parallelize). Also prints the packing ratio: real tokens /
padded slots for batches of 8 rows, with and without packing.

    .venv/bin/python bench/data_prep.py [--repeat 4] [--cutoff 1024]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ray_ft.config import parse_job
from ray_ft.data.examples import ExampleBuilder, qa_row
from ray_ft.data.packing import pack_table
from ray_ft.data.prepare import example_settings
from ray_ft.data.readers import read_qa_source
from ray_ft.data.shards import PACK_WINDOW, TRAIN_SCHEMA, ShardPlan, build_examples, fill_ratio, write_train_set
from ray_ft.data.split import split_by_group
from ray_ft.models import resolve_model

CMRC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cmrc2018" / "cmrc2018_dev.json"


def workload(repeat: int, seed: int) -> list[dict]:
    train, _ = split_by_group(read_qa_source(str(CMRC)), lambda r: r.passage_id, 0.2, seed)
    return [{**qa_row(r), "id": f"{r.id}~{k}"} for k in range(repeat) for r in train]


def plain_loop(rows: list[dict], plan: ShardPlan, out: Path) -> tuple[list[int], float]:
    """The same stage in one process: build, keep what fits, seeded order, write the examples'
    records, pack, write shards. Returns the row lengths and the build phase's seconds."""
    from transformers import AutoTokenizer

    t = time.perf_counter()
    builder = ExampleBuilder(AutoTokenizer.from_pretrained(plan.model_dir), plan.settings)
    built = sorted((builder.build(r) for r in rows), key=lambda b: b["order"])
    build_s = time.perf_counter() - t
    kept = [b for b in built if b["num_tokens"] > 0][: plan.max_samples]
    out.mkdir(parents=True)
    (out / "sft_train.jsonl").write_text("".join(b["record"] + "\n" for b in kept), encoding="utf-8")
    table = pa.Table.from_pylist([{k: b[k] for k in TRAIN_SCHEMA.names} for b in kept], schema=TRAIN_SCHEMA)
    if plan.packing:
        table = pa.concat_tables(pack_table(table.slice(i, PACK_WINDOW), plan.settings.cutoff_len)
                                 for i in range(0, table.num_rows, PACK_WINDOW))
    per = -(-table.num_rows // plan.num_shards)
    for s in range(plan.num_shards):
        pq.write_table(table.slice(s * per, per), out / f"part-{s:05d}.parquet")
    return table.column("num_tokens").to_pylist(), build_s


def read_rows(folder: Path) -> list[dict]:
    return pq.read_table(sorted(folder.glob("*.parquet"))).select(["input_ids", "labels"]).to_pylist()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeat", type=int, default=4)
    p.add_argument("--cutoff", type=int, default=1024)
    p.add_argument("--shards", type=int, default=2)
    args = p.parse_args()

    import ray

    model_dir = str(resolve_model("SmolLM2-135M-Instruct"))
    cfg = parse_job({"name": "bench", "model": {"name": model_dir},
                     "data": {"source": str(CMRC), "max_samples": None, "cutoff_len": args.cutoff}})
    rows = workload(args.repeat, cfg.data.seed)
    work = Path(tempfile.mkdtemp(prefix="bench_data_"))
    ray.init(num_cpus=4, include_dashboard=False, logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = {}
    # Fixed cost of a Ray Data build (actor start-up, tokenizer load, scheduling): 64 rows.
    fixed = {}
    for workers in (1, 2):
        t = time.perf_counter()
        build_examples(rows[:64], ShardPlan(example_settings(cfg), model_dir, None, False, 1, workers))
        fixed[workers] = time.perf_counter() - t
    for packing in (False, True):
        plan = ShardPlan(example_settings(cfg), model_dir, None, packing, args.shards, 1)
        tag = "packed" if packing else "padded"
        t = time.perf_counter()
        lengths, build_s = plain_loop(rows, plan, work / f"plain_{tag}")
        results[f"plain_{tag}"] = {"s": time.perf_counter() - t, "build_s": build_s,
                                   "fill_ratio_batch8": fill_ratio(lengths, 8)}
        reference = read_rows(work / f"plain_{tag}")
        for workers in (1, 2):
            wplan = dataclasses.replace(plan, num_workers=workers)
            out = work / f"ray{workers}_{tag}"
            t = time.perf_counter()
            stats = write_train_set(rows, wplan, out / "train", work / f"sft_{workers}_{tag}.jsonl", "bench")
            total = time.perf_counter() - t
            assert read_rows(out / "train") == reference, f"ray ({workers} workers, {tag}) rows differ from the loop's"
            t = time.perf_counter()
            build_examples(rows, wplan)  # the parallel phase alone (actor start-up included)
            results[f"ray_{workers}w_{tag}"] = {"s": total, "build_s": time.perf_counter() - t,
                                                "fill_ratio_batch8": stats["fill_ratio_batch8"]}
        tokens = stats["train_tokens"]
    ray.shutdown()

    n = len(rows)
    print(f"\n{n} examples in, {tokens} tokens kept (cutoff {args.cutoff}); same rows from every pipeline\n")
    print(f"{'pipeline':<18}{'seconds':>9}{'rows/s':>9}{'tokens/s':>10}{'vs loop':>9}"
          f"{'build s':>9}{'build rows/s':>14}{'vs loop':>9}{'fill@8':>8}")
    for tag in ("padded", "packed"):
        base, base_build = results[f"plain_{tag}"]["s"], results[f"plain_{tag}"]["build_s"]
        for name in (f"plain_{tag}", f"ray_1w_{tag}", f"ray_2w_{tag}"):
            r = results[name]
            print(f"{name:<18}{r['s']:>9.1f}{n / r['s']:>9.0f}{tokens / r['s']:>10.0f}{base / r['s']:>8.2f}x"
                  f"{r['build_s']:>9.1f}{n / r['build_s']:>14.0f}{base_build / r['build_s']:>8.2f}x"
                  f"{r['fill_ratio_batch8']:>8.3f}")
    for workers in (1, 2):
        steady = results[f"ray_{workers}w_padded"]["build_s"] - fixed[workers]
        print(f"ray {workers} actor(s): fixed build cost {fixed[workers]:.1f} s (64 rows); build rows/s past it "
              f"{(n - 64) / steady:.0f} vs loop {n / results['plain_padded']['build_s']:.0f}")
    print("\npacking ratio (real tokens / padded slots, batches of 8 rows): "
          f"padded {results['plain_padded']['fill_ratio_batch8']:.3f} -> packed {results['plain_packed']['fill_ratio_batch8']:.3f}")
    print(json.dumps({k: {kk: round(vv, 3) for kk, vv in v.items()} for k, v in results.items()}))


if __name__ == "__main__":
    main()
