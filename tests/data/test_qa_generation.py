"""The two generation steps and every filter, driven by hand-made replies (an engine in the test
that answers from a table), so each drop reason is exercised and counted."""

from __future__ import annotations

import json

from ray_ft.config import QAGenerationConfig
from ray_ft.data.qa_generation import (
    answer_schema, generate_qa, normalized, parse_answer, parse_questions, questions_schema, support, two_steps)

NODES = [
    {"node_id": "n0", "text": "The Marren was built in 2009 at the Kelby yard. It carries 420 passengers.",
     "metadata": {"document": "handbook.pdf", "page": 2}},
    {"node_id": "n1", "text": "A return ticket costs 12.50 pounds and is valid for 30 days. Tickets for the Marren, "
             "built at the Kelby yard, are sold online.",
     "metadata": {"document": "fares.md", "heading": "Fares > Returns"}},
    {"node_id": "n2", "text": "Dogs stay on a lead in the pet lounge.", "metadata": {"document": "pets.txt"}},
    {"node_id": "n3", "text": "This node's question request fails.", "metadata": {"document": "x.txt"}},
]

QUESTIONS = {  # node -> step-1 reply
    0: json.dumps({"questions": ["Where was the Marren built?", "How many passengers does the Marren carry?",
                                 "Why?", "In which year, 2009, was the Marren built?", "x" * 301,
                                 "What does the passage say about the Marren?"]}),
    1: json.dumps({"questions": ["How long is a return ticket valid?", "How long is the return ticket valid?",
                                 "What does a return ticket cost?", "Where was the Marren built?",
                                 "Who sells return tickets?"]}),
    2: "Sure! Here are some questions: 1. Where do dogs stay?",
}
ANSWERS = {  # question -> step-2 reply
    "Where was the Marren built?": '{"answer": "At the Kelby yard."}',
    "How many passengers does the Marren carry?": '{"answer": "420 passengers"}',
    "In which year, 2009, was the Marren built?": '{"answer": "2009"}',
    "How long is a return ticket valid?": '{"answer": "30 days"}',
    "How long is the return ticket valid?": '{"answer": "For 30 days."}',
    "What does a return ticket cost?": '{"answer": 12.5}',
    "Who sells return tickets?": '{"answer": "The harbour police at the ferry museum, every Sunday."}',
    "Why?": '{"answer": "Because."}',
    "What does the passage say about the Marren?": '{"answer": "built in 2009"}',
    "x" * 301: '{"answer": "x"}',
}


class TableWriter:
    """An engine answering each request from the tables above, run through the real two steps
    (as a writer's Ray Data actor runs them); node 3's question request fails."""

    def __init__(self):
        self.calls = []

    def write(self, nodes, gen, language):
        return two_steps(nodes, self.complete, gen, language)

    def complete(self, requests):
        self.calls.append(requests)
        out = []
        for r in requests:
            content = r["messages"][0]["content"]
            assert r["messages"][0]["role"] == "user" and "{" not in content[:20]
            if "answer" in r["schema"]["properties"]:
                question = max((q for q in ANSWERS if q in content), key=len)
                out.append({"reply": ANSWERS[question], "error": "", "generated_tokens": 5})
            elif NODES[3]["text"] in content:
                out.append({"reply": "", "error": "HTTP 503 on 5 attempt(s)", "generated_tokens": 0})
            else:
                node = next(i for i, n in enumerate(NODES) if n["text"] in content)
                out.append({"reply": QUESTIONS[node], "error": "", "generated_tokens": 20})
        return out


def test_every_filter_drops_its_case_and_counts_it():
    gen = QAGenerationConfig(questions_per_node=6)
    writer = TableWriter()
    rows, counts = generate_qa(NODES, writer, gen, "en")
    assert [(r["node_id"], r["question"], r["answer"]) for r in rows] == [
        ("n0", "Where was the Marren built?", "At the Kelby yard."),
        ("n0", "How many passengers does the Marren carry?", "420 passengers"),
        ("n1", "How long is a return ticket valid?", "30 days"),
    ]
    c = counts.to_dict()
    assert (c["nodes"], c["questions_requested"], c["questions_parsed"]) == (4, 24, 11)
    assert c["question_requests_failed"] == 1 and c["question_replies_unparseable"] == 1
    assert c["question_too_short"] == 1 and c["question_too_long"] == 1  # "Why?", "xxx..."
    assert c["question_contains_answer"] == 1  # "... 2009, ..." -> "2009"
    assert c["question_not_self_contained"] == 1  # "What does the passage say ...?"
    assert c["near_duplicate_question"] == 1  # "the return ticket" after "a return ticket", same node
    assert c["answer_replies_unparseable"] == 1  # {"answer": 12.5}
    assert c["duplicate_question"] == 1  # node 1 asks node 0's question again
    assert c["answer_not_supported"] == 1  # the harbour police are not in node 1
    assert c["kept"] == 3 and c["generated_tokens"] == 3 * 20 + 11 * 5
    dropped = sum(c[k] for k in ("question_too_short", "question_too_long", "question_contains_answer",
                                 "question_not_self_contained",
                                 "near_duplicate_question", "answer_replies_unparseable",
                                 "duplicate_question", "answer_not_supported"))
    assert c["kept"] + dropped == c["questions_parsed"]
    assert "harbour police" in c["examples"]["answer_not_supported"]
    # rows carry where their node sits; the ids are unique
    assert rows[0]["page"] == 2 and rows[2]["heading"] == "Fares > Returns" and rows[2]["document"] == "fares.md"
    assert len({r["id"] for r in rows}) == 3
    # step 2 asked only for the parsed questions, each with its node as context
    assert len(writer.calls) == 2 and len(writer.calls[1]) == 11
    assert [next(i for i, n in enumerate(NODES) if n["text"] in r["messages"][0]["content"])
            for r in writer.calls[1]] == [0] * 6 + [1] * 5


def test_short_answers_and_long_answers_have_their_own_counts():
    gen = QAGenerationConfig(questions_per_node=6, filters={"min_answer_chars": 8, "max_answer_chars": 16})
    rows, counts = generate_qa(NODES[:2], TableWriter(), gen, "en")
    assert counts.answer_too_short == 2  # "2009", "30 days"
    assert counts.answer_too_long == 3  # "At the Kelby yard." twice, the harbour police
    assert [r["answer"] for r in rows] == ["420 passengers", "For 30 days."]  # no near duplicate left
    assert counts.question_not_self_contained == 1
    off = QAGenerationConfig(questions_per_node=6, filters={"self_contained": False})
    rows, counts = generate_qa(NODES[:1], TableWriter(), off, "en")
    assert counts.question_not_self_contained == 0 and "What does the passage say about the Marren?" in {
        r["question"] for r in rows}


def test_requests_ask_for_the_schema_and_the_language():
    gen = QAGenerationConfig(questions_per_node=2)
    writer = TableWriter()
    generate_qa(NODES[:1], writer, gen, "zh")
    first = writer.calls[0][0]
    assert first["schema"] == questions_schema(2, gen.filters.max_question_chars)
    assert first["schema"]["properties"]["questions"]["minItems"] == 2
    assert "只根据这段文字" in first["messages"][0]["content"]
    assert first["max_tokens"] == 2 * gen.max_question_tokens + 16
    assert writer.calls[1][0]["schema"] == answer_schema(gen.filters.max_answer_chars)


def test_custom_prompts_replace_the_built_in_ones():
    gen = QAGenerationConfig(question_prompt="Q{n} about: {context}", answer_prompt="{question} | {context}")
    writer = TableWriter()
    generate_qa(NODES[:1], writer, gen, "en")
    assert writer.calls[0][0]["messages"][0]["content"] == f"Q2 about: {NODES[0]['text']}"
    assert writer.calls[1][0]["messages"][0]["content"] == f"Where was the Marren built? | {NODES[0]['text']}"


def test_parsers_and_support():
    assert parse_questions('{"questions": ["  Who  is\\nit? "]}') == ["Who is it?"]
    assert parse_questions('{"questions": []}') is None and parse_questions('["a"]') is None
    assert parse_questions('{"questions": [1]}') is None and parse_questions("no json") is None
    assert parse_answer('{"answer": " 42 "}') == "42" and parse_answer('{"answer": ""}') is None
    assert normalized("What's the  fare?") == "whatsthefare"
    assert support("30 days", "valid for 30 days") == 1.0
    assert support("purple days", "valid for 30 days") == 0.5
    assert support("岛上居民", "岛上的居民可以") == 1.0 and support("城市", "岛上的居民") == 0.0
