"""The first stage over a plain list of passages (the rerank stage's candidates) ranks as the
served retriever does."""

import numpy as np
import pytest

from ray_ft.config import RetrievalSettings
from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.kb.search import table_search
from ray_ft.serve.protocols import Hit
from tests.kb.test_store import EN, ZH, bm25_top, cosine_top, rrf


def letters(texts):
    out = np.zeros((len(texts), 26), np.float32)
    for i, t in enumerate(texts):
        for ch in t.lower():
            if "a" <= ch <= "z":
                out[i, ord(ch) - 97] += 1
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_dense_is_exact_cosine_and_bm25_matches_a_reference_bm25():
    questions = ["where did the cat sleep", "fiscal revenue growth", "net sales dollars"]
    dense = table_search(RetrievalSettings(mode="dense", query_instruction="q: "), letters, KnowledgeBaseConfig(), "en")
    got = dense(questions, EN, 3)
    for q, row in zip(questions, got):
        order, _ = cosine_top(letters(EN), letters(["q: " + q])[0], 3)
        assert row == [int(i) for i in order]
    bm25 = table_search(RetrievalSettings(mode="bm25"), None, KnowledgeBaseConfig(), "zh")
    zh_questions = ["中国的首都是哪里", "熊猫吃什么", "西湖在哪个城市"]
    assert [row[0] for row in bm25(zh_questions, ZH, 2)] == [bm25_top(ZH, q) for q in zh_questions]


def test_hybrid_fuses_the_two_rankings_by_reciprocal_rank():
    r = RetrievalSettings(mode="hybrid", candidates=6, rrf_k=60)
    q = "cat on the mat and fiscal revenue"
    (row,) = table_search(r, letters, KnowledgeBaseConfig(), "en")([q], EN, 6)
    dense = [Hit(str(i), "", 0.0) for i in cosine_top(letters(EN), letters([q])[0], 6)[0]]
    text = [Hit(str(i), "", 0.0) for i in table_search(RetrievalSettings(mode="bm25"), None,
                                                        KnowledgeBaseConfig(), "en")([q], EN, 6)[0]]
    want = rrf([dense, text], 6)
    assert sorted(row) == sorted(int(i) for i, _ in want)
    best = [i for i, s in want if s == pytest.approx(want[0][1])]
    assert str(row[0]) in best


def test_an_unresolved_mode_is_refused():
    with pytest.raises(ValueError, match="must be resolved"):
        table_search(RetrievalSettings(mode="auto"), letters, KnowledgeBaseConfig(), "en")
