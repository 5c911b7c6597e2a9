"""ANN recall@10 vs exact search on real vectors, per nprobes x refine_factor: how the
knowledge base's defaults were chosen.

10^4 nodes cut from Financial-QA-10k contexts (each sentence and each two-sentence window),
embedded by MiniLM into one LanceDB table with its IVF_HNSW_SQ index. Queries: the *first*
`--questions` Financial-QA questions (tests/kb/test_quality.py asserts recall on the last 200,
so the defaults are not tuned on what the test checks). Latency is the mean per query of the
whole `dense()` call.

    .venv/bin/python bench/ann_recall.py [--nodes 10000] [--questions 200] [--nprobes 20 40] [--refine 0 2 5]
"""

from __future__ import annotations

import argparse
import csv
import re
import tempfile
import time
from pathlib import Path

import numpy as np

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.kb.store import KnowledgeBase, node_row
from ray_ft.models import resolve_model

FINQA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--questions", type=int, default=200)
    ap.add_argument("--nprobes", type=int, nargs="+", default=[20, 40])
    ap.add_argument("--refine", type=int, nargs="+", default=[0, 2, 5], help="refine_factor (0: none)")
    args = ap.parse_args()
    with FINQA.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = []
    for t in dict.fromkeys(r["context"] for r in rows):
        sents = [s for s in re.split(r"(?<=[.!?])\s+", t) if s.strip()]
        texts += sents + [" ".join(sents[i:i + 2]) for i in range(len(sents) - 1)]
    texts = list(dict.fromkeys(texts))[:args.nodes]
    emb = SentenceTransformerEmbedder(str(resolve_model("all-MiniLM-L6-v2")), batch_size=128)
    vecs = emb.embed(texts)
    queries = emb.embed([r["question"] for r in rows[:args.questions]])
    exact = [{f"w{i}" for i in np.argsort(-(vecs @ q))[:10]} for q in queries]
    with tempfile.TemporaryDirectory() as tmp:
        kb = KnowledgeBase(tmp, "nodes", "minilm", None, KnowledgeBaseConfig(ann_min_rows=min(5_000, len(texts))), "en")
        kb.upsert([node_row({"node_id": f"w{i}", "text": t, "metadata": {}}) for i, t in enumerate(texts)], vecs)
        t0 = time.perf_counter()
        indexes = kb.ensure_indexes()
        print(f"{len(texts)} nodes, {len(queries)} queries; indexes {', '.join(indexes)} in "
              f"{time.perf_counter() - t0:.1f} s")
        print("| nprobes | refine_factor | recall@10 vs exact | ms per query |")
        print("|---:|---:|---:|---:|")
        for nprobes in args.nprobes:
            for refine in args.refine:
                cfg = KnowledgeBaseConfig(nprobes=nprobes, refine_factor=refine or None)
                reader = KnowledgeBase(tmp, "nodes", "minilm", None, cfg, "en")
                t0 = time.perf_counter()
                hits = [reader.dense(q, 10) for q in queries]
                ms = 1000 * (time.perf_counter() - t0) / len(queries)
                recall = np.mean([len({h.node_id for h in hs} & e) / 10 for hs, e in zip(hits, exact)])
                print(f"| {nprobes} | {refine or '-'} | {recall:.3f} | {ms:.1f} |", flush=True)


if __name__ == "__main__":
    main()
