"""Building SFT examples: templates, cutoff_len truncation that never cuts the answer."""

import json

import pytest

from ray_ft.data.examples import DROPPED, DROPPED_ANSWER, OK, SHORTENED, ExampleBuilder, ExampleSettings, qa_row
from ray_ft.data.records import QARecord
from ray_ft.data.tokenize import IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(smollm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_dir)


def _builder(tok, cutoff, truncation="shorten_context", template=None, fmt="messages"):
    return ExampleBuilder(tok, ExampleSettings("You are a helpful assistant.", "en", template, cutoff,
                                               truncation, fmt, 42))


FILLER = " ".join(f"Sentence number {i} talks about nothing in particular." for i in range(60))
ANSWER = "the Golden Gate Bridge"


def _record(answer_at: str) -> QARecord:
    fact = f"The most photographed landmark is {ANSWER}."
    half = len(FILLER) // 2
    context = {"start": fact + " " + FILLER, "middle": FILLER[:half] + fact + " " + FILLER[half:],
               "end": FILLER + " " + fact}[answer_at]
    return QARecord("q", "p", context, "What is the most photographed landmark?", (ANSWER,), context.index(ANSWER))


def _answer_tokens(ex_row):
    return [t for t in ex_row["labels"] if t != IGNORE_INDEX]


@pytest.mark.parametrize("answer_at", ["start", "middle", "end"])
def test_shorten_context_keeps_the_answer_span_and_fits(tok, answer_at):
    rec = _record(answer_at)
    full = _builder(tok, 4096).build(qa_row(rec))
    assert full["status"] == OK and full["num_tokens"] > 400
    out = _builder(tok, 300).build(qa_row(rec))
    assert out["status"] == SHORTENED
    assert 300 - 40 < out["num_tokens"] <= 300 and len(out["input_ids"]) == out["num_tokens"]
    # The context is a contiguous piece of the original that still holds the answer, and the
    # trained tokens are exactly the answer turn of the untruncated example.
    assert ANSWER in out["context"] and out["context"] in rec.context and len(out["context"]) < len(rec.context)
    assert _answer_tokens(out) == _answer_tokens(full)
    record = json.loads(out["record"])
    assert out["context"] in record["messages"][0]["content"] and record["context_ids"] == ["p"]


def test_drop_policy_and_answers_that_cannot_fit(tok):
    rec = _record("middle")
    dropped = _builder(tok, 300, truncation="drop").build(qa_row(rec))
    assert dropped["status"] == DROPPED and dropped["num_tokens"] == 0 and dropped["input_ids"] == []
    long_answer = QARecord("q", "p", "x " * 50 + "A" * 600, "Q?", ("A" * 600,), 100)
    out = _builder(tok, 120).build(qa_row(long_answer))
    assert out["status"] == DROPPED_ANSWER and out["num_tokens"] == 0 and out["input_ids"] == []


def test_abstractive_answer_keeps_the_head_of_the_context(tok):
    rec = QARecord("q", "p", "HEAD " + FILLER, "What is said?", ("Nothing much is said.",), -1)
    out = _builder(tok, 200).build(qa_row(rec))
    assert out["status"] == SHORTENED and out["context"].startswith("HEAD ") and out["num_tokens"] <= 200


def test_custom_template_and_alpaca_records(tok):
    rec = QARecord("q1", "p", "Paris is in France.", "Where is Paris?", ("France",), 12)
    out = _builder(tok, 512, template="Q: {question}\nC: {context}", fmt="alpaca").build(qa_row(rec))
    record = json.loads(out["record"])
    assert record["instruction"] == "Q: Where is Paris?\nC: Paris is in France." and record["output"] == "France"
    assert tok.decode(_answer_tokens(out)).strip() == "France<|im_end|>"


def test_chat_rows_over_cutoff_are_dropped(tok):
    from ray_ft.data.examples import chat_row
    from ray_ft.data.records import Conversation, Turn

    conv = Conversation("c", "g", "Sys", (Turn("hi " * 200, "ok"),))
    dropped = _builder(tok, 64).build(chat_row(conv))
    assert dropped["status"] == DROPPED and dropped["num_tokens"] == 0 and dropped["labels"] == []
    out = _builder(tok, 1024).build(chat_row(conv))
    assert out["status"] == OK and out["answers"] == ["ok"] and out["context"] == ""
    assert "<|im_start|>system\nSys<|im_end|>" in tok.decode(out["input_ids"])  # its own system prompt
