"""The knowledge base at scale: the LanceDB table per corpus size.

Corpora of N nodes are cut from real text (Financial-QA-10k contexts and CMRC2018 passages,
sentence windows; past the real text, the same windows with a numbered perturbation so no two
nodes are equal). Vectors: synthetic unit vectors of the embedder's dimension (384), since
embedding 10^5+ nodes with MiniLM takes hours on 2 cores: clustered like text embeddings are
(one of n/100 topic centres plus noise; plain Gaussian vectors have no neighbourhoods, so an
ANN index's recall on them is meaningless). The real embedder's quality is measured in
bench/retrieval_modes.py. Queries are nodes' vectors plus a little noise: the node a query came
from is its true nearest neighbour (recall@1), and exact search gives the true top 10.

Per size it prints: table write and index build time, on-disk size; dense search p50/p95 and
recall@10 exact vs ANN (IVF_HNSW_SQ past `ann_min_rows`), full-text and hybrid p50/p95; the RSS the opened table adds to the process that holds it
(a retriever replica's cost). (Until 2026-12-05 it also ran the in-memory store that the table
replaced: its numbers are in bench/RESULTS.md with the commit that measured them.)

    .venv/bin/python bench/kb_scale.py --sizes 10000 100000 [--queries 200]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.kb.store import KnowledgeBase, node_row

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"
DIM = 384


def sentence_windows() -> list[str]:
    """Three-sentence windows of every Financial-QA context and CMRC passage."""
    with (SHARED / "financial-qa-10k" / "financial_qa_10k.csv").open(newline="", encoding="utf-8") as f:
        texts = list(dict.fromkeys(r["context"] for r in csv.DictReader(f)))
    doc = json.loads((SHARED / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))
    texts += [p["context"] for a in doc["data"] for p in a["paragraphs"]]
    out = []
    for t in texts:
        sents = [s for s in re.split(r"(?<=[.!?。！？])\s*", t) if s.strip()]
        out += [" ".join(sents[i:i + 3]) for i in range(0, max(1, len(sents)), 2)]
    return out


def corpus(n: int, windows: list[str]) -> list[dict]:
    return [{"node_id": f"n{i}", "text": windows[i % len(windows)] + ("" if i < len(windows) else f" (v{i // len(windows)})"),
             "metadata": {"passage_id": f"d{i // 8}"}} for i in range(n)]


def unit(n: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = unit(max(1, n // 100), seed + 1)
    v = centres[rng.integers(0, len(centres), n)] + 0.08 * rng.standard_normal((n, DIM)).astype(np.float32)
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def timed(fn, queries) -> tuple[list, float, float]:
    out, ms = [], []
    for q in queries:
        t0 = time.perf_counter()
        out.append(fn(q))
        ms.append(1000 * (time.perf_counter() - t0))
    return out, float(np.percentile(ms, 50)), float(np.percentile(ms, 95))


def folder_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run_size(n: int, windows: list[str], n_queries: int, ann_min_rows: int) -> list[str]:
    nodes, vecs = corpus(n, windows), clustered(n, seed=n)
    rng = np.random.default_rng(1)
    picks = rng.choice(n, n_queries, replace=False)
    qvecs = vecs[picks] + 0.02 * unit(n_queries, seed=2)
    qvecs /= np.linalg.norm(qvecs, axis=1, keepdims=True)
    qtexts = [" ".join(nodes[i]["text"].split()[:6]) or nodes[i]["text"][:12] for i in picks]
    rows = []
    exact_ids = [list(np.argsort(-(vecs @ q))[:10]) for q in qvecs]
    with tempfile.TemporaryDirectory() as tmp:
        uri = Path(tmp) / "kb.lance"
        before = rss_mb()
        kb = KnowledgeBase(str(uri), "nodes", "bench", None, KnowledgeBaseConfig(ann_min_rows=ann_min_rows),
                           "en")
        t0 = time.perf_counter()
        for s in range(0, n, 20_000):
            kb.upsert([node_row(x) for x in nodes[s:s + 20_000]], vecs[s:s + 20_000])
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        indexes = kb.ensure_indexes()
        index_s = time.perf_counter() - t0
        reader = KnowledgeBase(str(uri), "nodes", "bench", None, KnowledgeBaseConfig(), "en")
        hits, p50, p95 = timed(lambda q: reader.dense(q, 10), qvecs)
        recall = np.mean([len({int(h.node_id[1:]) for h in hs} & set(e)) / 10 for hs, e in zip(hits, exact_ids)])
        recall1 = np.mean([hs[0].node_id == f"n{i}" for hs, i in zip(hits, picks)])
        _, t50, t95 = timed(lambda q: reader.text(q, 10), qtexts)
        _, h50, h95 = timed(lambda qv: reader.hybrid(qv[0], qv[1], 10, 50), list(zip(qvecs, qtexts)))
        lance_rss = rss_mb() - before
        ann = f"ANN {kb.cfg.ann_index}" if f"{kb.column}_idx" in indexes else "exact"
        rows.append(f"| {n:,} | lancedb | {write_s:.1f} | {index_s:.1f} ({', '.join(indexes)}) | {folder_mb(uri):.0f} "
                    f"| {ann}: {p50:.1f} / {p95:.1f} | {recall1:.3f} / {recall:.3f} | {t50:.1f} / {t95:.1f} | {h50:.1f} / {h95:.1f} "
                    f"| {lance_rss:.0f} |")

    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--ann-min-rows", type=int, default=100_000)
    args = ap.parse_args()
    windows = sentence_windows()
    with tempfile.TemporaryDirectory() as tmp:  # load LanceDB's runtime first: RSS then counts data only
        warm = KnowledgeBase(tmp, "warm", "bench", None, KnowledgeBaseConfig(), "en")
        warm.upsert([node_row(x) for x in corpus(10, windows)], unit(10, 0))
        warm.ensure_indexes(), warm.hybrid(unit(1, 1)[0], "revenue", 3, 5)
    print(f"{len(windows):,} distinct real text windows; {os.cpu_count()} CPUs; peak RSS so far "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    print("| nodes | store | write s | index build s | disk MB | dense p50 / p95 ms | recall@1 / @10 vs exact "
          "| full-text p50 / p95 ms | hybrid p50 / p95 ms | RSS added MB |")
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|")
    for n in args.sizes:
        for row in run_size(n, windows, args.queries, args.ann_min_rows):
            print(row, flush=True)


if __name__ == "__main__":
    main()
