"""Two-stage retrieval, measured: a first stage (dense) fetches candidates, a reranker reorders them.

`candidate_groups` builds, for held-out questions, the first stage's top-n passages over the
distinct gold passages of the split (the protocol of `ray_ft.metrics.retriever`; the first stage
is any `Search`: dense here, the served retriever's BM25 or hybrid in the rerank stage); `rank_metrics`
scores any order of those candidates: hit@1 (= recall@1 with one gold passage), hit@5 and MRR@10.
A gold passage the first stage did not fetch counts as missed by every order, so the reranked
numbers are bounded by the first stage's recall@n (reported as `candidate_recall`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ray_ft.metrics.retriever import EmbedFn


@dataclass(frozen=True)
class CandidateGroup:
    query: str
    candidates: list[str]  # the first stage's order
    gold: int  # index of the gold passage in candidates; -1: not fetched

    def to_dict(self) -> dict:
        return {"query": self.query, "candidates": self.candidates, "gold": self.gold}

    @classmethod
    def from_dict(cls, d: dict) -> "CandidateGroup":
        return cls(d["query"], list(d["candidates"]), int(d["gold"]))


Search = Callable[[list[str], list[str], int], list[list[int]]]  # (questions, passages, n) -> top-n indices


def dense_search(embed: EmbedFn, query_prefix: str = "") -> Search:
    """Top-n by exact cosine of the embedder's vectors (queries prefixed)."""
    def search(questions: list[str], passages: list[str], n: int) -> list[list[int]]:
        pvec = np.asarray(embed(passages), dtype=np.float32)
        qvec = np.asarray(embed([query_prefix + q for q in questions]), dtype=np.float32)
        return [[int(i) for i in row] for row in np.argsort(-(qvec @ pvec.T), axis=1, kind="stable")[:, :n]]

    return search


def candidate_groups(search: Search, questions: list[str], contexts: list[str], n: int) -> list[CandidateGroup]:
    """Each question's top-n passages by `search` among the distinct `contexts`;
    `contexts[i]` is question i's gold passage."""
    kb = sorted(set(contexts))
    if not questions:
        return []
    groups = []
    for q, gold, ranked in zip(questions, contexts, search(questions, kb, min(n, len(kb)))):
        texts = [kb[i] for i in ranked]
        groups.append(CandidateGroup(q, texts, texts.index(gold) if gold in texts else -1))
    return groups


def gold_rank(group: CandidateGroup, order: list[int]) -> int | None:
    """0-based rank of the gold passage in `order` (indices into group.candidates); None: absent."""
    if group.gold < 0:
        return None
    return order.index(group.gold) if group.gold in order else None


def rank_metrics(groups: list[CandidateGroup], orders: list[list[int]]) -> dict:
    """Means over questions of hit@1, hit@5 and MRR@10 of the gold passage in each order."""
    ranks = [gold_rank(g, o) for g, o in zip(groups, orders)]
    return {
        "n_queries": len(groups),
        "hit_at_1": float(np.mean([r is not None and r < 1 for r in ranks])),
        "hit_at_5": float(np.mean([r is not None and r < 5 for r in ranks])),
        "mrr_at_10": float(np.mean([1.0 / (r + 1) if r is not None and r < 10 else 0.0 for r in ranks])),
        "candidate_recall": float(np.mean([g.gold >= 0 for g in groups])),
    }


def first_stage_orders(groups: list[CandidateGroup]) -> list[list[int]]:
    return [list(range(len(g.candidates))) for g in groups]


def reranked_orders(groups: list[CandidateGroup],
                    score: Callable[[str, list[str]], np.ndarray]) -> list[list[int]]:
    """Each group's candidates by descending score (ties keep the first stage's order)."""
    return [[int(i) for i in np.argsort(-np.asarray(score(g.query, g.candidates)), kind="stable")] for g in groups]


def to_markdown(rows: dict[str, dict]) -> str:
    """One table row per named order (e.g. "dense", "dense + rerank")."""
    first = next(iter(rows.values()))
    lines = [f"{first['n_queries']} held-out questions; candidates fetched by the first stage: "
             f"recall {100 * first['candidate_recall']:.1f}%.\n",
             "| retrieval | hit@1 | hit@5 | MRR@10 |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {100 * m['hit_at_1']:.2f} | {100 * m['hit_at_5']:.2f} | {100 * m['mrr_at_10']:.2f} |"
              for name, m in rows.items()]
    return "\n".join(lines) + "\n"
