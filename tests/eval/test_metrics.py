import numpy as np
import pytest

from ray_ft.eval.metrics import clipped_cosine, exact_match, origin_score, percentile
from ray_ft.eval.runner import summarize, to_markdown


def test_exact_match_strips_and_uses_the_first_reference():
    assert exact_match("  北京 \n", ["北京", "北京市"]) == 1.0
    assert exact_match("北京市", ["北京", "北京市"]) == 0.0  # the seed compares with the first only
    assert exact_match("", ["北京"]) == 0.0
    with pytest.raises(ValueError):
        exact_match("x", [])


def test_origin_score_every_word_must_occur_in_context():
    ctx = "The Nile flows through Egypt and Sudan."
    assert origin_score("the Nile", ctx) == 0.0  # "the" (lower case) is not in the context
    assert origin_score("Nile Egypt", ctx) == 1.0
    assert origin_score("Egypt Kenya", ctx) == 0.0
    assert origin_score("", ctx) == 0.0 and origin_score("   ", ctx) == 0.0
    assert origin_score("长江", "中国最长的河是长江。") == 1.0  # Chinese: a substring test
    assert origin_score("黄河", "中国最长的河是长江。") == 0.0


def test_clipped_cosine_values():
    a = np.array([[1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    b = np.array([[2.0, 0.0], [-1.0, 0.0], [4.0, 3.0], [1.0, 0.0]])
    np.testing.assert_allclose(clipped_cosine(a, b), [1.0, 0.0, 0.96, 0.0])


def test_summary_table_numbers_and_markdown():
    rows = [
        {"model": "base", "mode": "gold", "em": 0.0, "cosine": 0.5, "origin": 0.0, "latency_s": 1.0},
        {"model": "base", "mode": "gold", "em": 1.0, "cosine": 0.9, "origin": 1.0, "latency_s": 3.0},
        {"model": "finetuned", "mode": "retrieved", "em": 1.0, "cosine": 1.0, "origin": 1.0,
         "context_hit": 1.0, "latency_s": 2.0},
    ]
    table = summarize(rows, wall_s={("base", "gold"): 4.0, ("finetuned", "retrieved"): 0.5})
    base = next(t for t in table if t["model"] == "base")
    assert base["n"] == 2 and base["em"] == 0.5 and base["cosine"] == pytest.approx(0.7)
    assert base["origin"] == 0.5 and base["latency_p50_s"] == 2.0 and base["context_hit"] is None
    md = to_markdown(table)
    assert base["throughput_rps"] == 0.5
    assert "| base | gold | 2 | 50.0% | 0.700 | 50.0% | — | 2.00 | 2.90 | 0.50 |" in md
    assert "| finetuned | retrieved | 1 | 100.0% | 1.000 | 100.0% | 100.0% | 2.00 | 2.00 | 2.00 |" in md
    assert summarize(rows)[0]["throughput_rps"] is None
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
