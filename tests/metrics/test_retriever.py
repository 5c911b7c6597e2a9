"""Retrieval evaluation of an embedder over a test split, with a deterministic embedder."""

import pytest

from ray_ft.metrics.retriever import evaluate_retriever, to_markdown
from tests.eval.fakes import CharCountEmbedder


def test_evaluate_retriever_by_hand():
    # Character-count vectors: "aaa" is closest to "aaaa", "bbb" to "bbbb", "ab" ties go by order.
    contexts = ["aaaa.", "bbbb.", "aaaa."]
    questions = ["aaa", "bbb", "cc"]
    emb = CharCountEmbedder()
    got = evaluate_retriever(emb, questions, contexts, top_k=2, splitter=".")
    assert got["n_queries"] == 3 and got["n_passages"] == 2  # the knowledge base is de-duplicated
    # q1 -> aaaa (rank 1), q2 -> bbbb (rank 1), q3 "cc" -> orthogonal to both: stable order puts
    # "aaaa." first, its gold is "aaaa." too -> rank 1.
    assert got["recall_at_1"] == 1.0 and got["mrr_at_2"] == 1.0 and got["ndcg_at_2"] == 1.0
    assert got["context_recall"] == 1.0 and got["context_relevance"] == 1.0
    # The prefix goes on queries only: "aaaaaaa" + "b" now retrieves the a-passage first.
    plain = evaluate_retriever(CharCountEmbedder(), ["b", "a"], ["bbbb.", "aaaa."], 2, ".")
    prefixed = evaluate_retriever(CharCountEmbedder(), ["b", "a"], ["bbbb.", "aaaa."], 2, ".",
                                  query_prefix="aaaaaaa")
    assert plain["recall_at_1"] == 1.0 and prefixed["recall_at_1"] == 0.5
    assert prefixed["mrr_at_2"] == pytest.approx((0.5 + 1.0) / 2)
    # recall@5 ranks 5 deep even when top_k is 1: the b-question's passage is second.
    top1 = evaluate_retriever(CharCountEmbedder(), ["b", "a"], ["bbbb.", "aaaa."], 1, ".", query_prefix="aaaaaaa")
    assert top1["recall_at_1"] == 0.5 and top1["recall_at_5"] == 1.0 and top1["mrr_at_1"] == 0.5


def test_markdown_before_after():
    before = {"n_queries": 3, "n_passages": 2, "recall_at_1": 0.5, "mrr_at_10": 0.6}
    after = {"n_queries": 3, "n_passages": 2, "recall_at_1": 0.75, "mrr_at_10": 0.8}
    md = to_markdown(before, after)
    assert "| recall_at_1 | 50.00 | 75.00 | +25.00 |" in md and "3 questions over 2 passages" in md
    assert "| mrr_at_10 | 60.00 | 80.00 | +20.00 |" in md
    with pytest.raises(KeyError):
        to_markdown(before, {"n_queries": 3})


def test_markdown_columns_compares_the_last_with_the_first():
    from ray_ft.metrics.retriever import columns_markdown

    cols = {"base": {"n_queries": 4, "n_passages": 3, "recall_at_1": 0.25},
            "contrastive": {"n_queries": 4, "n_passages": 3, "recall_at_1": 0.5},
            "LSR": {"n_queries": 4, "n_passages": 3, "recall_at_1": 0.75}}
    md = columns_markdown(cols)
    assert "| metric | base | contrastive | LSR | LSR vs base |" in md
    assert "| recall_at_1 | 25.00 | 50.00 | 75.00 | +50.00 |" in md and "4 questions over 3 passages" in md
