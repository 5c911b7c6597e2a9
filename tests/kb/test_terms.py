from ray_ft.kb.terms import lexical_tokens


def test_lexical_tokens_words_and_cjk_bigrams():
    assert lexical_tokens("The Cat's mat, 2023!") == ["the", "cat", "s", "mat", "2023"]
    assert lexical_tokens("北京首都") == ["北", "京", "首", "都", "北京", "京首", "首都"]
    assert lexical_tokens("GDP在北京") == ["gdp", "在", "北", "京", "在北", "北京"]
