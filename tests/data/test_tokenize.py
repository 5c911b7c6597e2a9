import pytest

from ray_ft.data.templates import build_prompt
from ray_ft.data.tokenize import IGNORE_INDEX, render_prompt, tokenize_example
from ray_ft.errors import RayFTError


@pytest.fixture(scope="module")
def tok(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def test_prompt_is_masked_and_labels_are_exactly_the_answer_turn(tok):
    user = build_prompt("北京是中国的首都。", "中国的首都是哪里？", "zh")
    ex = tokenize_example(tok, "You are a helpful assistant.", user, "北京")
    prompt_ids = tok(render_prompt(tok, "You are a helpful assistant.", user), add_special_tokens=False)["input_ids"]
    n = len(prompt_ids)
    assert ex.input_ids[:n] == prompt_ids
    assert ex.labels[:n] == [IGNORE_INDEX] * n
    assert ex.labels[n:] == ex.input_ids[n:]
    # Unmasked tokens decode to the answer followed by the end-of-turn marker, nothing else.
    assert tok.decode(ex.labels[n:]).strip() == "北京<|im_end|>"
    assert ex.num_label_tokens == len(ex.input_ids) - n


def test_system_prompt_replaces_the_builtin_one(tok):
    text = render_prompt(tok, "You are a helpful assistant.", "hi")
    assert text.count("<|im_start|>system\nYou are a helpful assistant.<|im_end|>") == 1
    assert "SmolLM" not in text and text.endswith("<|im_start|>assistant\n")


def test_tokenizer_without_chat_template_is_rejected(tok):
    from copy import deepcopy

    bare = deepcopy(tok)
    bare.chat_template = None
    with pytest.raises(RayFTError, match="has no chat template"):
        tokenize_example(bare, "s", "u", "a")


def test_templates_match_the_recipe():
    assert build_prompt("C", "Q", "zh") == "请用下面的文段的原文来回答问题\n\n### 已知文段：C\n\n### 问题：Q\n"
    assert build_prompt("C", "Q", "en") == (
        "Please use the original text of the following paragraph to answer the question\n\n"
        "### Known paragraph: C\n\n### Question: Q\n")
