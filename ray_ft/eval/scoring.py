"""Batched driver of the QA metrics: a whole eval set scored with a handful of embedder calls.

The seed recipe scores one (prediction, reference) pair per embedder call. Here every distinct
text is embedded once (references repeat across models and modes, and many predictions repeat),
sorted by length so a batch pads little, in batches of `batch_size`; the string metrics are
plain Python per row.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ray_ft.metrics.qa import (
    clipped_cosine, cmrc_exact_match, cmrc_f1, exact_match, origin_char_score, origin_score,
)
from ray_ft.metrics.retrieval import context_recall, context_relevance, mrr_at_k, ndcg_at_k, recall_at_k

EmbedFn = Callable[[list[str]], np.ndarray]

# Per-row score columns, in report order, with what the report calls them.
SCORE_COLUMNS: dict[str, str] = {
    "em": "EM (seed)",
    "cmrc_em": "EM (CMRC)",
    "cmrc_f1": "F1 (CMRC)",
    "cosine": "cosine",
    "origin": "origin (seed, words)",
    "origin_char": "origin (chars)",
}
# Retrieved mode only: how good the contexts the generator saw were (ray_ft.metrics.retrieval).
RETRIEVAL_COLUMNS: dict[str, str] = {
    "context_hit": "context hit",
    "recall_at_k": "recall@k",
    "mrr_at_k": "MRR@k",
    "ndcg_at_k": "nDCG@k",
    "context_recall": "context recall",
    "context_relevance": "context relevance",
}


def embed_unique(texts: list[str], embed: EmbedFn, batch_size: int = 128) -> np.ndarray:
    """Embed `texts` (one row each) calling `embed` once per batch of distinct texts."""
    distinct = sorted(set(texts), key=len)
    vecs: dict[str, np.ndarray] = {}
    for i in range(0, len(distinct), batch_size):
        chunk = distinct[i:i + batch_size]
        out = np.asarray(embed(chunk))
        if len(out) != len(chunk):
            raise ValueError(f"embedder returned {len(out)} vectors for {len(chunk)} texts")
        vecs.update(zip(chunk, out))
    if not texts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.stack([vecs[t] for t in texts])


def score_retrieval(row: dict, splitter: str, recall_threshold: float = 0.5) -> None:
    """Retrieved-mode columns from `retrieved_ids` (node ids `passage[:line]`), `retrieved_texts`,
    `gold_passage_id` and `gold_context`; k = the number of contexts retrieved."""
    pids = [i.split(":")[0] for i in row["retrieved_ids"]]
    gold, k = {row["gold_passage_id"]}, max(1, len(pids))
    row["context_hit"] = float(row["gold_passage_id"] in pids)
    row["recall_at_k"] = recall_at_k(pids, gold, k)
    row["mrr_at_k"] = mrr_at_k(pids, gold, k)
    row["ndcg_at_k"] = ndcg_at_k(pids, gold, k)
    texts, refs = row["retrieved_texts"], [row["gold_context"]]
    row["context_recall"] = context_recall(texts, refs, recall_threshold)["fractional"]
    row["context_relevance"] = context_relevance(texts, refs, splitter)


def score_rows(rows: list[dict], embed: EmbedFn, batch_size: int = 128, splitter: str = "。") -> list[dict]:
    """Add every score column to each row (needs prediction, references, context).

    An empty (or whitespace) prediction scores 0 everywhere, cosine included: the embedding of ""
    is not an answer. Retrieved-mode rows also get the `RETRIEVAL_COLUMNS` (`splitter` cuts the
    retrieved texts into sentences for context relevance).
    """
    if not rows:
        return rows
    vecs = embed_unique([r["prediction"] for r in rows] + [r["references"][0] for r in rows],
                        embed, batch_size)
    cos = clipped_cosine(vecs[:len(rows)], vecs[len(rows):])
    for r, c in zip(rows, cos):
        pred, refs = r["prediction"], r["references"]
        r["em"] = exact_match(pred, refs)
        r["cmrc_em"] = cmrc_exact_match(pred, refs)
        r["cmrc_f1"] = cmrc_f1(pred, refs)
        r["cosine"] = float(c) if pred.strip() else 0.0
        r["origin"] = origin_score(pred, r["context"])
        r["origin_char"] = origin_char_score(pred, r["context"])
        if r.get("mode") in ("retrieved", "reranked"):
            score_retrieval(r, splitter)
    return rows
