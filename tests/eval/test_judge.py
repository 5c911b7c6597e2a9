"""LLM-as-judge logic with a scripted chat model (the served-model path is in test_runner.py)."""

import json

import numpy as np
import pytest

from ray_ft.eval.judge import (
    JudgeSettings, MalformedReply, answer_relevance, ask_json, faithfulness, judge_rows,
    parse_json_object, string_list,
)
from ray_ft.errors import RayFTError
from ray_ft.metrics.qa import clipped_cosine
from tests.eval.fakes import CharCountEmbedder


class ScriptedChat:
    """Replies from a list, in order; records every conversation it was sent."""

    def __init__(self, replies):
        self.replies = list(replies)
        self.sent: list[list[dict]] = []

    def chat(self, messages, max_tokens, temperature=0.0, json_schema=None):
        assert json_schema is not None  # every judge call asks for structured output
        self.sent.append(messages)
        return self.replies.pop(0)


def test_parse_json_object_tolerates_wrapping_and_names_the_problem():
    assert parse_json_object('Sure! ```json\n{"a": [1]}\n```') == {"a": [1]}
    with pytest.raises(MalformedReply, match="no JSON object"):
        parse_json_object("I think yes.")
    with pytest.raises(MalformedReply, match="unterminated JSON object"):
        parse_json_object('{"questions": ["a", "b"')
    with pytest.raises(MalformedReply, match="invalid JSON"):
        parse_json_object('{"a": [1,}')
    with pytest.raises(MalformedReply, match="2 to 2 items, got 1"):
        string_list({"q": ["x"]}, "q", 2, 2)
    with pytest.raises(MalformedReply, match="non-empty strings"):
        string_list({"q": ["x", ""]}, "q", 1, 2)


def test_ask_json_retries_with_the_error_then_gives_up():
    s = JudgeSettings(max_retries=2)
    chat = ScriptedChat(["nope", '{"questions": ["a?"]}'])
    value, tries = ask_json(chat, "p", {}, lambda o: string_list(o, "questions", 1, 1), s)
    assert value == ["a?"] and tries == 2
    # The retry carries the bad reply and what was wrong with it.
    assert chat.sent[1][-2] == {"role": "assistant", "content": "nope"}
    assert "no JSON object" in chat.sent[1][-1]["content"]

    chat = ScriptedChat(["x", "y", "z", '{"questions": ["never read"]}'])
    with pytest.raises(MalformedReply, match="after 3 attempts"):
        ask_json(chat, "p", {}, lambda o: string_list(o, "questions", 1, 1), s)
    assert len(chat.sent) == 3


def test_answer_relevance_is_the_mean_clipped_cosine_of_generated_questions():
    emb = CharCountEmbedder()
    generated = ["长江多长?", "哪条河最长?", "abc"]
    chat = ScriptedChat([json.dumps({"questions": generated}, ensure_ascii=False)])
    got = answer_relevance(chat, emb, "中国最长的河是哪条?", "长江", "ctx", JudgeSettings(n_questions=3))
    vecs = CharCountEmbedder()(["中国最长的河是哪条?", *generated])
    want = clipped_cosine(np.repeat(vecs[:1], 3, axis=0), vecs[1:]).mean()
    assert got["score"] == pytest.approx(want) and got["generated_questions"] == generated
    assert got["attempts"] == 1
    # An empty answer answers nothing and costs no call.
    assert answer_relevance(ScriptedChat([]), emb, "q", " ", "ctx", JudgeSettings())["score"] == 0.0


def test_faithfulness_is_the_share_of_supported_statements():
    chat = ScriptedChat([
        '{"statements": ["The Nile is in Africa.", "It is 10 km long.", "It flows north."]}',
        '{"verdicts": [true, false]}',  # wrong length -> re-asked
        '{"verdicts": [true, false, true]}',
    ])
    got = faithfulness(chat, "q", "The Nile is in Africa, 10 km long, flowing north.", "ctx",
                       JudgeSettings())
    assert got["score"] == pytest.approx(2 / 3) and got["verdicts"] == [True, False, True]
    assert got["attempts"] == 3
    assert "3. It flows north." in chat.sent[1][-1]["content"]  # statements numbered for the judge


def test_judge_rows_records_failures_instead_of_scores():
    rows = [{"question": "q", "prediction": "Paris", "context": "c"}]
    bad = ScriptedChat(["garbage"] * 10)
    judge_rows(rows, bad, CharCountEmbedder(), JudgeSettings(max_retries=1), concurrency=1)
    assert rows[0]["judge_relevance"] is None and rows[0]["judge_faithfulness"] is None
    assert "after 2 attempts" in rows[0]["judge_relevance_error"]
    assert len(bad.sent) == 4  # 2 attempts for relevance, 2 for the statements

    class Down:
        def chat(self, *a, **k):
            raise RayFTError("POST http://judge/v1/chat/completions -> 400: prompt too long")

    rows = [{"question": "q", "prediction": "Paris", "context": "c"}, {"question": "q2", "prediction": "", "context": "c"}]
    judge_rows(rows, Down(), CharCountEmbedder(), JudgeSettings(), concurrency=2)
    assert rows[0]["judge_faithfulness"] is None and "400: prompt too long" in rows[0]["judge_faithfulness_error"]
    assert rows[1]["judge_relevance"] == 0.0  # an empty answer needs no call, so still scored
