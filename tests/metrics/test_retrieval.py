"""Retrieval metrics on hand-made rankings and passages."""

import math

import pytest

from ray_ft.metrics.retrieval import (
    context_recall, context_relevance, mrr_at_k, ndcg_at_k, recall_at_k, split_sentences,
)


def test_ranking_metrics_by_hand():
    ranking = ["d3", "d1", "d7", "d2"]
    rel = {"d1", "d2"}
    assert recall_at_k(ranking, rel, 1) == 0.0
    assert recall_at_k(ranking, rel, 2) == 0.5 and recall_at_k(ranking, rel, 10) == 1.0
    assert mrr_at_k(ranking, rel, 1) == 0.0 and mrr_at_k(ranking, rel, 10) == 0.5
    # DCG@4 = 1/log2(3) + 1/log2(5); ideal = 1/log2(2) + 1/log2(3).
    want = (1 / math.log2(3) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert ndcg_at_k(ranking, rel, 4) == pytest.approx(want)
    assert ndcg_at_k(["d1", "d2"], rel, 2) == 1.0
    assert ndcg_at_k(["d1", "d1"], {"d1"}, 2) == 1.0  # a repeated hit (two lines of one passage) counts once
    with pytest.raises(ValueError):
        recall_at_k(ranking, set(), 3)


def test_context_recall_uses_levenshtein_similarity_threshold():
    ref = "The Nile flows into the Mediterranean Sea."
    near = "The Nile flows into the Mediterranean."  # 5 edits over 42 chars: similarity ~0.88
    far = "Apple's net sales were 383 billion dollars."
    assert context_recall([far, near], [ref]) == {"fractional": 1.0, "binary": 1.0}
    assert context_recall([far], [ref]) == {"fractional": 0.0, "binary": 0.0}
    assert context_recall([near], [ref], threshold=0.95)["binary"] == 0.0
    two = context_recall([near], [ref, "Mount Everest is 8,849 metres tall."])
    assert two == {"fractional": 0.5, "binary": 0.0}


def test_context_relevance_counts_retrieved_sentences_found_in_the_reference():
    ref = "长江是中国最长的河。它流入东海。"
    assert split_sentences("长江是中国最长的河。它流入东海。", "。") == ["长江是中国最长的河", "它流入东海"]
    assert context_relevance(["长江是中国最长的河。黄河在北方。"], [ref], "。") == 0.5
    assert context_relevance(["It is long. It is wide."], ["It was long and wide"], ".") == 0.0
    assert context_relevance(["It is long. Really."], ["It is long."], ".") == 0.5
    assert context_relevance(["   "], [ref], "。") == 0.0
