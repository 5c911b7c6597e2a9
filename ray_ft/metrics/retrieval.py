"""Retrieval metrics: ranking metrics over ids, and the seed recipe's text-based context metrics.

Ranking (binary relevance, `relevant` = the ids of the gold passages):
- recall@k: share of relevant ids among the first k retrieved;
- MRR@k: 1 / rank of the first relevant id within the first k, else 0;
- nDCG@k: DCG of the first k (gain 1 / log2(rank + 1)) over the DCG of an ideal ranking.

Text (no ids needed, so they also score a knowledge base built any other way):
- context recall: a reference passage counts as recalled when some retrieved text has a
  normalized Levenshtein similarity >= `threshold` (default 0.5) to it; fractional = share of
  references recalled, binary = all of them recalled;
- context relevance: the retrieved texts are split into sentences (`。` for Chinese, `.` for
  English, or any splitter); the share of those sentences found in a reference passage.
"""

from __future__ import annotations

import math
import re

from rapidfuzz.distance import Levenshtein

SENTENCE_SPLITTERS = {"zh": "。", "en": "."}


def recall_at_k(retrieved: list[str], relevant: set[str], k: int) -> float:
    if not relevant:
        raise ValueError("recall_at_k needs at least one relevant id")
    return len(set(retrieved[:k]) & relevant) / len(relevant)


def mrr_at_k(retrieved: list[str], relevant: set[str], k: int) -> float:
    for rank, doc in enumerate(retrieved[:k], start=1):
        if doc in relevant:
            return 1.0 / rank
    return 0.0


def ndcg_at_k(retrieved: list[str], relevant: set[str], k: int) -> float:
    if not relevant:
        raise ValueError("ndcg_at_k needs at least one relevant id")
    seen: set[str] = set()
    dcg = 0.0
    for rank, doc in enumerate(retrieved[:k], start=1):
        if doc in relevant and doc not in seen:  # a repeated hit earns nothing twice
            dcg += 1.0 / math.log2(rank + 1)
            seen.add(doc)
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(k, len(relevant)) + 1))
    return dcg / ideal


def context_recall(retrieved: list[str], references: list[str], threshold: float = 0.5) -> dict:
    """{"fractional": share of references recalled, "binary": 1.0 when all are}."""
    if not references:
        raise ValueError("context_recall needs at least one reference passage")
    hits = sum(
        any(Levenshtein.normalized_similarity(r, ref) >= threshold for r in retrieved)
        for ref in references
    )
    frac = hits / len(references)
    return {"fractional": frac, "binary": float(frac == 1.0)}


def split_sentences(text: str, splitter: str) -> list[str]:
    return [s.strip() for s in re.split(re.escape(splitter), text) if s.strip()]


def context_relevance(retrieved: list[str], references: list[str], splitter: str) -> float:
    """Share of the retrieved sentences that occur in some reference passage (0 when none)."""
    sentences = [s for text in retrieved for s in split_sentences(text, splitter)]
    if not sentences:
        return 0.0
    return sum(any(s in ref for ref in references) for s in sentences) / len(sentences)
