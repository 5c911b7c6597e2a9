"""Retrieval quality and speed of the retriever's modes side by side: dense (MiniLM, exact cosine),
BM25, and hybrid (reciprocal-rank fusion of both), on CMRC2018 dev (Chinese) and Financial-QA-10k
(English), searched in the knowledge-base table as served (LanceDB: flat vector search, its BM25
full-text index with the language's tokenizer, its hybrid query with RRF). Hit@k: the question's
own passage is among the top k, with a 95% bootstrap interval. In-process, the class the served
retriever uses; the query vectors are computed once and shared, so queries/s is the search alone.
(Until 2026-12-05 it also ran the in-memory store the table replaced, with the paired hit@1
difference: those numbers are in bench/RESULTS.md with the commit that measured them.)

    .venv/bin/python bench/retrieval_modes.py [--passages 300] [--questions 600] [--skip 0]
                                              [--fts-tokenizer auto] [--modes dense bm25 hybrid]
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.eval.intervals import bootstrap_ci
from ray_ft.kb.store import KnowledgeBase, node_row
from ray_ft.models import resolve_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def cmrc(n_passages: int, skip: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    """Passages skip..skip+n_passages of CMRC2018 dev (in file order) and their questions."""
    doc = json.loads((SHARED / "cmrc2018" / "cmrc2018_dev.json").read_text(encoding="utf-8"))
    paras = [p for art in doc["data"] for p in art["paragraphs"]][skip:skip + n_passages]
    nodes = [{"node_id": f"p{skip + i}", "text": p["context"]} for i, p in enumerate(paras)]
    questions = [(qa["question"], f"p{skip + i}") for i, p in enumerate(paras) for qa in p["qas"]]
    return nodes, questions


def finqa(n_passages: int, skip: int = 0) -> tuple[list[dict], list[tuple[str, str]]]:
    with (SHARED / "financial-qa-10k" / "financial_qa_10k.csv").open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    contexts = list(dict.fromkeys(r["context"] for r in rows))[skip:skip + n_passages]
    ids = {t: f"p{skip + i}" for i, t in enumerate(contexts)}
    questions = [(r["question"], ids[r["context"]]) for r in rows if r["context"] in ids]
    return [{"node_id": i, "text": t} for t, i in ids.items()], questions


def searches(nodes: list[dict], vecs: np.ndarray, language: str, folder: str, fts_tokenizer: str) -> dict:
    """mode -> search(query, query_vector) -> top-5 hits."""
    kb = KnowledgeBase(folder, "nodes", "bench", None, KnowledgeBaseConfig(fts_tokenizer=fts_tokenizer), language)
    kb.upsert([node_row(n) for n in nodes], vecs)
    kb.ensure_indexes()
    return {"dense": lambda q, v: kb.dense(v, 5), "bm25": lambda q, v: kb.text(q, 5),
            "hybrid": lambda q, v: kb.hybrid(v, q, 5, 50)}


def _ci(values) -> str:
    lo, hi = bootstrap_ci(values)
    return f"{np.mean(values):.1%} [{lo:.1%}, {hi:.1%}]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--passages", type=int, default=300)
    ap.add_argument("--questions", type=int, default=600)
    ap.add_argument("--skip", type=int, default=0, help="start at this passage (another slice than the reported one)")
    ap.add_argument("--fts-tokenizer", default="auto", choices=["auto", "words", "cjk", "ngram"])
    ap.add_argument("--modes", nargs="+", default=["dense", "bm25", "hybrid"])
    args = ap.parse_args()
    emb = SentenceTransformerEmbedder(str(resolve_model("all-MiniLM-L6-v2")))
    print("| data | mode | questions | hit@1 | hit@5 | queries/s (search only) |")
    print("|---|---|---:|---:|---:|---:|")
    for name, language, (nodes, questions) in (("CMRC2018 dev (zh)", "zh", cmrc(args.passages, args.skip)),
                                               ("Financial-QA-10k (en)", "en", finqa(args.passages, args.skip))):
        questions = questions[: args.questions]
        qvecs = emb.embed([q for q, _ in questions])
        with tempfile.TemporaryDirectory() as folder:
            for mode, search in searches(nodes, emb.embed([n["text"] for n in nodes]), language,
                                         folder, args.fts_tokenizer).items():
                if mode not in args.modes:
                    continue
                t0 = time.perf_counter()
                ranked = [[h.node_id for h in search(q, v)] for (q, _), v in zip(questions, qvecs)]
                qps = len(questions) / (time.perf_counter() - t0)
                hit1 = [float(r[:1] == [gold]) for r, (_, gold) in zip(ranked, questions)]
                hit5 = [float(gold in r) for r, (_, gold) in zip(ranked, questions)]
                print(f"| {name}, {len(nodes)} passages | {mode} | {len(questions)} | {_ci(hit1)} "
                      f"| {_ci(hit5)} | {qps:.0f} |", flush=True)

if __name__ == "__main__":
    main()
