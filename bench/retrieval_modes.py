"""Retrieval quality and speed of the retriever's modes side by side: dense (MiniLM, exact cosine),
BM25, and hybrid (reciprocal-rank fusion of both), on CMRC2018 dev (Chinese) and Financial-QA-10k
(English). Hit@k: the question's own passage is among the top k. In-process, the same classes
the served retriever uses (VectorIndex, BM25Index, reciprocal_rank_fusion).

    .venv/bin/python bench/retrieval_modes.py [--passages 300] [--questions 600]
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from ray_ft.models import resolve_model
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.serve.engines import VectorIndex
from ray_ft.serve.retrieval import BM25Index, reciprocal_rank_fusion

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def cmrc(n_passages: int) -> tuple[list[dict], list[tuple[str, str]]]:
    doc = json.loads((SHARED / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))
    nodes, questions = [], []
    for art in doc["data"]:
        for para in art["paragraphs"]:
            if len(nodes) == n_passages:
                return nodes, questions
            pid = f"p{len(nodes)}"
            nodes.append({"node_id": pid, "text": para["context"]})
            questions += [(qa["question"], pid) for qa in para["qas"]]
    return nodes, questions


def finqa(n_passages: int) -> tuple[list[dict], list[tuple[str, str]]]:
    with (SHARED / "financial-qa-10k" / "financial_qa_10k.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    ids: dict[str, str] = {}
    questions = []
    for r in rows:
        if r["context"] not in ids:
            if len(ids) == n_passages:
                continue
            ids[r["context"]] = f"p{len(ids)}"
        questions.append((r["question"], ids[r["context"]]))
    return [{"node_id": i, "text": t} for t, i in ids.items()], questions


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=300)
    ap.add_argument("--questions", type=int, default=600)
    args = ap.parse_args()
    emb = SentenceTransformerEmbedder(str(resolve_model("all-MiniLM-L6-v2")))
    print("| data | mode | questions | hit@1 | hit@5 | queries/s (query embedding included) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, (nodes, questions) in (("CMRC2018 dev (zh)", cmrc(args.passages)),
                                     ("Financial-QA-10k (en)", finqa(args.passages))):
        questions = questions[: args.questions]
        dense = VectorIndex(nodes, emb.embed([n["text"] for n in nodes]))
        bm25 = BM25Index(nodes)
        modes = {
            "dense": lambda q, v: dense.search(v, 5),
            "bm25": lambda q, v: bm25.search(q, 5),
            "hybrid": lambda q, v: reciprocal_rank_fusion([dense.search(v, 50), bm25.search(q, 50)], 5),
        }
        for mode, search in modes.items():
            t0 = time.perf_counter()
            qvecs = emb.embed([q for q, _ in questions]) if mode != "bm25" else [None] * len(questions)
            ranked = [[h.node_id for h in search(q, v)] for (q, _), v in zip(questions, qvecs)]
            qps = len(questions) / (time.perf_counter() - t0)
            hit1 = sum(r[:1] == [gold] for r, (_, gold) in zip(ranked, questions)) / len(questions)
            hit5 = sum(gold in r for r, (_, gold) in zip(ranked, questions)) / len(questions)
            print(f"| {name}, {len(nodes)} passages | {mode} | {len(questions)} | {hit1:.1%} | {hit5:.1%} | {qps:.0f} |")


if __name__ == "__main__":
    main()
