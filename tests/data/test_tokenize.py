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


def test_multi_turn_labels_are_exactly_the_trained_replies(tok):
    from ray_ft.data.tokenize import tokenize_conversation

    msgs = [{"role": "system", "content": "S"},
            {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "five"},
            {"role": "user", "content": "Really?"}, {"role": "assistant", "content": "four"}]
    ex = tokenize_conversation(tok, msgs, [False, True])
    whole = tok(tok.apply_chat_template(msgs, tokenize=False), add_special_tokens=False)["input_ids"]
    assert ex.input_ids == whole  # turn-by-turn tokens are the whole conversation's tokens
    trained = [t for t in ex.labels if t != IGNORE_INDEX]
    assert tok.decode(trained).strip() == "four<|im_end|>"  # the weight-0 reply is context only
    both = tokenize_conversation(tok, msgs)
    assert tok.decode([t for t in both.labels if t != IGNORE_INDEX]).split() == ["five<|im_end|>", "four<|im_end|>"]
    # Labels are positionally aligned: every unmasked label equals the input token at its place.
    assert all(lab == tid for lab, tid in zip(both.labels, both.input_ids) if lab != IGNORE_INDEX)


def test_template_that_rewrites_history_is_rejected(tok):
    from copy import deepcopy

    from ray_ft.data.tokenize import tokenize_conversation

    odd = deepcopy(tok)
    # A template that shows only the last user turn (as some reasoning templates drop history).
    odd.chat_template = ("{% for m in messages %}{% if m.role != 'user' or loop.revindex <= 2 %}"
                         "{{ m.role }}: {{ m.content }}\n{% endif %}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(RayFTError, match="does not render turn 2 as an extension of the turns before it"):
        tokenize_conversation(odd, msgs)
