"""The batched scorer: every distinct text embedded once, per-row scores as the metric functions."""

import numpy as np
import pytest

from ray_ft.metrics.qa import clipped_cosine, cmrc_f1
from ray_ft.eval.scoring import embed_unique, score_rows
from tests.eval.fakes import CharCountEmbedder


def _row(pred, refs, ctx, mode="gold", **kw):
    return {"prediction": pred, "references": refs, "context": ctx, "mode": mode, **kw}


def test_embed_unique_calls_once_per_batch_of_distinct_texts():
    emb = CharCountEmbedder()
    texts = ["bb", "a", "bb", "ccc", "a", "dddd", "eeeee"]
    vecs = embed_unique(texts, emb, batch_size=2)
    assert len(emb.calls) == 3  # 5 distinct texts in batches of 2
    assert sorted(t for c in emb.calls for t in c) == ["a", "bb", "ccc", "dddd", "eeeee"]
    assert [len(t) for c in emb.calls for t in c] == [1, 2, 3, 4, 5]  # sorted by length
    np.testing.assert_array_equal(vecs, CharCountEmbedder()(texts))


def test_score_rows_matches_the_metric_functions_row_by_row():
    ctx = "中国最长的河是长江，全长6300公里。"
    rows = [
        _row("长江", ["长江"], ctx),
        _row("黄河", ["长江", "扬子江"], ctx),
        _row("  ", ["长江"], ctx),
        _row("长江", ["长江"], ctx, mode="retrieved", gold_passage_id="p1", retrieved_ids=["p2", "p1:0"],
             retrieved_texts=["黄河在北方。", ctx], gold_context=ctx),
        _row("长江", ["长江"], ctx, mode="retrieved", gold_passage_id="p1", retrieved_ids=["p2"],
             retrieved_texts=["黄河在北方。"], gold_context=ctx),
    ]
    emb = CharCountEmbedder()
    score_rows(rows, emb)
    assert len(emb.calls) == 1 and sorted(emb.calls[0]) == sorted(["长江", "黄河", "  "])
    assert [r["em"] for r in rows] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert [r["origin"] for r in rows] == [1.0, 0.0, 0.0, 1.0, 1.0]
    assert [r["origin_char"] for r in rows] == [1.0, 0.5, 0.0, 1.0, 1.0]
    assert rows[1]["cmrc_f1"] == cmrc_f1("黄河", ["长江", "扬子江"])
    want = clipped_cosine(CharCountEmbedder()(["黄河"]), CharCountEmbedder()(["长江"]))[0]
    assert rows[1]["cosine"] == pytest.approx(want) and rows[0]["cosine"] == pytest.approx(1.0)
    assert rows[2]["cosine"] == 0.0  # an empty answer gets no semantic credit
    assert "context_hit" not in rows[0]
    assert [r["context_hit"] for r in rows[3:]] == [1.0, 0.0]
    # Gold passage second of two: MRR 1/2, nDCG 1/log2(3); 1 of the 2 retrieved sentences is gold.
    assert rows[3]["recall_at_k"] == 1.0 and rows[3]["mrr_at_k"] == 0.5
    assert rows[3]["ndcg_at_k"] == pytest.approx(1 / np.log2(3))
    assert rows[3]["context_recall"] == 1.0 and rows[3]["context_relevance"] == 0.5
    assert [rows[4][k] for k in ("recall_at_k", "mrr_at_k", "ndcg_at_k", "context_recall",
                                 "context_relevance")] == [0.0] * 5


@pytest.mark.slow
def test_batched_scores_equal_the_seed_per_pair_loop_with_minilm(minilm_dir):
    from ray_ft.embedder import SentenceTransformerEmbedder

    embedder = SentenceTransformerEmbedder(str(minilm_dir))
    preds = ["Paris", "the river Nile", "", "8,849 metres", "Apple", "Paris"]
    refs = ["Paris", "Nile", "Everest", "8849 m", "Apple Inc.", "Lyon"]
    rows = [_row(p, [r], "ctx") for p, r in zip(preds, refs)]
    score_rows(rows, embedder.embed, batch_size=4)
    seed = [float(clipped_cosine(*np.split(embedder.embed([p, r]), 2))[0]) if p else 0.0
            for p, r in zip(preds, refs)]
    np.testing.assert_allclose([r["cosine"] for r in rows], seed, atol=1e-5)
    assert rows[0]["cosine"] == pytest.approx(1.0, abs=1e-5)
    # A right answer in other words scores above a wrong city: Nile ~0.93 > Lyon-for-Paris ~0.50.
    assert rows[1]["cosine"] > 0.8 > rows[5]["cosine"]
