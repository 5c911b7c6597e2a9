"""Building the knowledge base with Ray Data: nodes/s with 1 and 2 embedding actors.

The same real nodes (three-sentence windows of Financial-QA-10k contexts) are embedded by the real
MiniLM and written to a fresh LanceDB table per setting, through `build_knowledge_base` (the code
`ray-ft kb build` and the deploy step run). Settings: embedding actors x CPUs (= torch threads) per
actor. Per setting: the whole build (actor start, model load, embed, commits, full-text index) and
the steady rate between the first and the last commit (the build logs each commit; the bench
timestamps those records), so start-up and throughput are told apart. A warm-up build first, so
the Ray cluster's own start is in none of them.

    .venv/bin/python bench/kb_build.py [--nodes 4000] [--settings 1x1 2x1 1x2] [--write-every 500]
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import re
import tempfile
import time
from pathlib import Path

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.kb.build import build_knowledge_base

FINQA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


class CommitTimes(logging.Handler):
    """perf_counter() of each 'embedded and committed' record of ray_ft.kb."""

    def __init__(self):
        super().__init__()
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "committed" in record.getMessage():
            self.times.append(time.perf_counter())


def windows(n: int) -> list[dict]:
    with FINQA.open(newline="", encoding="utf-8") as f:
        contexts = list(dict.fromkeys(r["context"] for r in csv.DictReader(f)))
    out = []
    for t in contexts:
        sents = [s for s in re.split(r"(?<=[.!?])\s+", t) if s.strip()]
        out += [" ".join(sents[i:i + 3]) for i in range(0, max(1, len(sents)), 2)]
    out = list(dict.fromkeys(out))[:n]
    return [{"node_id": f"w{i}", "text": w, "metadata": {"document": f"d{i // 4}"}} for i, w in enumerate(out)]


def build(nodes: list[dict], model_dir: str, workers: int, cpus: float, write_every: int) -> dict:
    handler = CommitTimes()
    logging.getLogger("ray_ft.kb").addHandler(handler)
    logging.getLogger("ray_ft.kb").setLevel(logging.INFO)
    cfg = KnowledgeBaseConfig(embed_workers=workers, embed_cpus=cpus, write_every=write_every)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            out = build_knowledge_base(nodes, str(Path(tmp) / "kb.lance"), "nodes", model_dir, "float32", cfg, "en")
            total = time.perf_counter() - t0
    finally:
        logging.getLogger("ray_ft.kb").removeHandler(handler)
    t = handler.times
    steady = (len(nodes) - write_every) / (t[-1] - t[0]) if len(t) > 1 else float("nan")
    return {"embedded": out.embedded, "total_s": total, "first_commit_s": t[0] - t0 if t else float("nan"),
            "steady": steady, "rows": out.rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=4000)
    ap.add_argument("--settings", nargs="+", default=["1x1", "2x1", "1x2"], help="ACTORSxCPUS")
    ap.add_argument("--write-every", type=int, default=500)
    args = ap.parse_args()
    import ray

    from ray_ft.models import resolve_model

    model_dir = str(resolve_model("all-MiniLM-L6-v2"))
    nodes = windows(args.nodes)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    import ray.data  # noqa: F401  (quiet_libraries switches its progress bars off once imported)

    from ray_ft.console import quiet_libraries

    quiet_libraries()  # the table below, not Ray Data's progress lines
    build(nodes[:200], model_dir, 1, 1, 100)  # warm-up: cluster and Ray Data start
    print(f"{len(nodes)} nodes (Financial-QA windows), all-MiniLM-L6-v2 fp32, {os.cpu_count()} CPUs, "
          f"commits of {args.write_every}")
    print("| actors x CPUs | nodes | build s (all) | first commit s | nodes/s (all) | nodes/s (steady) |")
    print("|---|---:|---:|---:|---:|---:|")
    for s in args.settings:
        workers, cpus = (float(x) for x in s.split("x"))
        r = build(nodes, model_dir, int(workers), cpus, args.write_every)
        assert r["embedded"] == r["rows"] == len(nodes), r
        print(f"| {int(workers)} x {cpus:g} | {len(nodes)} | {r['total_s']:.1f} | {r['first_commit_s']:.1f} "
              f"| {len(nodes) / r['total_s']:.0f} | {r['steady']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
