"""Two-stage retrieval metrics by hand: candidates from a toy embedder, gold ranks in any order."""

import numpy as np
import pytest

from ray_ft.metrics.reranking import (
    CandidateGroup, candidate_groups, dense_search, first_stage_orders, rank_metrics, reranked_orders, to_markdown,
)

# 2-d "embeddings": each text's vector is looked up, so the cosine ranking is known.
VECS = {"a": [1.0, 0.0], "b": [0.8, 0.6], "c": [0.0, 1.0], "qa": [1.0, 0.0], "qc": [0.6, 0.8], "qx": [1.0, 0.0], "qb": [0.8, 0.6]}


def embed(texts):
    return np.array([VECS[t] for t in texts])


def test_candidates_are_the_first_stage_top_n_with_the_gold_position():
    # the knowledge base is the distinct gold passages: a, b, c
    groups = candidate_groups(dense_search(embed), ["qa", "qc", "qx", "qb"], ["a", "c", "c", "b"], n=2)
    assert groups[0] == CandidateGroup("qa", ["a", "b"], 0)
    assert groups[1] == CandidateGroup("qc", ["b", "c"], 1)  # qc.b = 0.96 > qc.c = 0.8
    assert groups[2] == CandidateGroup("qx", ["a", "b"], -1)  # gold "c" not fetched
    assert groups[3] == CandidateGroup("qb", ["b", "a"], 0)
    assert CandidateGroup.from_dict(groups[1].to_dict()) == groups[1]


def test_rank_metrics_by_hand():
    groups = [CandidateGroup("q1", list("abcdefg"), 0), CandidateGroup("q2", list("abcdefg"), 6),
              CandidateGroup("q3", list("ab"), -1)]
    dense = rank_metrics(groups, first_stage_orders(groups))
    assert dense == {"n_queries": 3, "hit_at_1": pytest.approx(1 / 3), "hit_at_5": pytest.approx(1 / 3),
                     "mrr_at_10": pytest.approx((1 + 1 / 7) / 3), "candidate_recall": pytest.approx(2 / 3)}
    # a reranker that puts q2's gold first and q1's third
    scores = {"q1": [0.5, 0.9, 0.8, 0, 0, 0, 0], "q2": [0, 0, 0, 0, 0, 0, 1.0], "q3": [0.2, 0.1]}
    orders = reranked_orders(groups, lambda q, texts: np.array(scores[q]))
    assert orders[0] == [1, 2, 0, 3, 4, 5, 6]  # ties (zeros) keep the first stage's order
    got = rank_metrics(groups, orders)
    assert got["hit_at_1"] == pytest.approx(1 / 3) and got["hit_at_5"] == pytest.approx(2 / 3)
    assert got["mrr_at_10"] == pytest.approx((1 / 3 + 1) / 3)
    table = to_markdown({"dense": dense, "dense + rerank": got})
    assert "| dense + rerank | 33.33 | 66.67 | 44.44 |" in table and "recall 66.7%" in table
