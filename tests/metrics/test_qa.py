import numpy as np
import pytest

from ray_ft.metrics.qa import (
    clipped_cosine, cmrc_exact_match, cmrc_f1, cmrc_tokens, exact_match, origin_char_score,
    origin_score, percentile,
)


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


def test_percentile():
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert np.isnan(percentile([], 95))


def test_cmrc_tokens_mixed_segmentation():
    # CJK one token per character; other runs split at spaces/CJK; punctuation deleted; lower-case.
    assert cmrc_tokens("Ray 2.0版本，很快！") == ["ray", "20", "版", "本", "很", "快"]
    assert cmrc_tokens("《红楼梦》的作者") == ["红", "楼", "梦", "的", "作", "者"]
    assert cmrc_tokens("U.S. Army") == ["us", "army"]
    assert cmrc_tokens("  ，。!?  ") == []


def test_cmrc_f1_equals_hand_computation():
    # pred 北京大学 vs ref 北京: longest common run 2; p = 2/4, r = 2/2; F1 = 2*0.5*1/1.5 = 2/3.
    assert cmrc_f1("北京大学", ["北京"]) == pytest.approx(2 / 3)
    # Longest *contiguous* run, not bag overlap: 京北 vs 北京 share both characters but run is 1.
    # p = 1/2, r = 1/2 -> F1 = 0.5.
    assert cmrc_f1("京北", ["北京"]) == pytest.approx(0.5)
    # Max over references: ref 2 matches exactly (after punctuation removal and lower-casing).
    assert cmrc_f1("Apple公司。", ["苹果", "apple公司"]) == pytest.approx(1.0)
    # Mixed: tokens [ray, 20, 版] vs [ray, 20]: run 2; p = 2/3, r = 1 -> F1 = 0.8.
    assert cmrc_f1("Ray 2.0版", ["ray 2.0"]) == pytest.approx(0.8)
    # 1 shared token of 6 predicted and 3 reference: p = 1/6, r = 1/3 -> F1 = 2/9.
    assert cmrc_f1("长江是最长的", ["黄河长"]) == pytest.approx(2 / 9)
    assert cmrc_f1("", ["北京"]) == 0.0 and cmrc_f1("。。", ["北京"]) == 0.0
    assert cmrc_f1("上海", ["北京"]) == 0.0
    with pytest.raises(ValueError):
        cmrc_f1("x", [])


def test_cmrc_exact_match_normalizes_and_takes_any_reference():
    assert cmrc_exact_match("《北京》。", ["北京市", "北京"]) == 1.0  # second reference, punctuation
    assert cmrc_exact_match("Apple  Inc.", ["apple inc"]) == 1.0
    assert cmrc_exact_match("北京市", ["北京"]) == 0.0
    assert cmrc_exact_match("", [""]) == 0.0  # an empty answer never matches
    # The seed's EM is stricter: exact string, first reference only.
    assert exact_match("《北京》。", ["北京市", "北京"]) == 0.0


def test_origin_char_score_gives_partial_credit_where_the_seed_gives_none():
    ctx = "中国最长的河是长江，全长6300公里。"
    assert origin_char_score("长江", ctx) == 1.0
    assert origin_char_score("长江。", ctx) == 1.0  # punctuation ignored
    # 黄 and 河: 河 is in the context, 黄 is not -> 1/2; the seed's word test gives 0.
    assert origin_char_score("黄河", ctx) == 0.5 and origin_score("黄河", ctx) == 0.0
    # Mixed Chinese/English: "6300 km" -> chars 6,3,0,0,k,m; the four digits occur, k and m not.
    assert origin_char_score("6300 km", ctx) == pytest.approx(4 / 6)
    assert origin_char_score("", ctx) == 0.0 and origin_char_score(" ，", ctx) == 0.0
