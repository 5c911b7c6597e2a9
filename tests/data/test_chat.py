"""Alpaca and OpenAI-messages instruction data: readers, validation, conversion both ways."""

import json

import pytest

from ray_ft.data.readers import read_source
from ray_ft.data.records import Conversation, Turn, to_alpaca, to_messages
from ray_ft.data.chat import alpaca_conversation, messages_conversation
from ray_ft.errors import RayFTError


def _write(path, rows, jsonl=True):
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows) if jsonl else json.dumps(rows)
    path.write_text(text, encoding="utf-8")
    return str(path)


ALPACA = [
    {"instruction": "Translate to French", "input": "cat", "output": "chat"},
    {"id": "a2", "instruction": "And dog?", "output": "chien", "system": "You translate.",
     "history": [["Translate to French: cat", "chat"]]},
]


def test_alpaca_json_and_jsonl_read_the_same_conversations(tmp_path):
    as_json = read_source(_write(tmp_path / "a.json", ALPACA, jsonl=False))
    as_jsonl = read_source(_write(tmp_path / "a.jsonl", ALPACA))
    assert as_json.format == as_jsonl.format == "alpaca" and as_json.qa is None
    first, second = as_json.chats
    assert first.turns == (Turn("Translate to French\ncat", "chat"),) and first.system is None
    assert first.id == "[0]" and as_jsonl.chats[0].id == "L1"  # position when there is no id
    assert second.id == "a2" and second.system == "You translate."
    assert second.turns == (Turn("Translate to French: cat", "chat"), Turn("And dog?", "chien"))
    assert [c.turns for c in as_jsonl.chats] == [c.turns for c in as_json.chats]


MESSAGES = [
    {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
    {"id": "m2", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "5", "weight": 0},
        {"role": "user", "content": "Really?"}, {"role": "assistant", "content": "4"}]},
]


def test_messages_single_and_multi_turn_with_weights(tmp_path):
    data = read_source(_write(tmp_path / "m.jsonl", MESSAGES))
    single, multi = data.chats
    assert data.format == "messages"
    assert single.turns == (Turn("Hi", "Hello!"),) and single.system is None
    assert multi.system == "Be brief."
    assert multi.turns == (Turn("2+2?", "5", train=False), Turn("Really?", "4"))


def test_conversion_both_ways():
    conv = messages_conversation(MESSAGES[1], "line 2")
    # messages -> Alpaca -> messages is the identity (weights included).
    alpaca = to_alpaca(conv)
    assert alpaca == {"id": "m2", "instruction": "Really?", "input": "", "output": "4",
                      "history": [["2+2?", "5"]], "system": "Be brief."}
    back = messages_conversation(to_messages(conv), "x")
    assert back == conv and to_messages(conv)["messages"] == MESSAGES[1]["messages"]
    # Alpaca -> messages folds `input` into the user turn; -> Alpaca again keeps that turn.
    a = alpaca_conversation(ALPACA[0], "[0]")
    msgs = to_messages(a)["messages"]
    assert msgs == [{"role": "user", "content": "Translate to French\ncat"}, {"role": "assistant", "content": "chat"}]
    again = alpaca_conversation(to_alpaca(messages_conversation({"messages": msgs}, "x")), "y")
    assert again.turns == a.turns
    # Alpaca history survives the round trip through messages.
    h = alpaca_conversation(ALPACA[1], "[1]")
    assert alpaca_conversation(to_alpaca(messages_conversation(to_messages(h), "z")), "w") == h


@pytest.mark.parametrize("row, message", [
    ({"input": "x", "output": "y"}, r"line 1: field 'instruction' missing or empty"),
    ({"instruction": "x", "output": "  "}, r"line 1: field 'output' missing or empty"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]},
     r"line 1: field 'history\[0\]' must be a \[user, assistant\] pair"),
    ({"id": 7, "instruction": "x", "output": "y", "system": 3}, r"line 1 \(id=7\): field 'system' is not a string"),
])
def test_bad_alpaca_records(tmp_path, row, message):
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(RayFTError, match=message):
        read_source(path, "alpaca")


@pytest.mark.parametrize("msgs, message", [
    ([], r"field 'messages' missing or empty"),
    ([{"role": "user", "content": "q"}], r"field 'messages': expected user/assistant pairs ending with an assistant reply"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}],
     r"field 'messages\[0\]': expected a user message followed by an assistant reply, got assistant then user"),
    ([{"role": "tool", "content": "x"}, {"role": "assistant", "content": "a"}],
     r"field 'messages\[0\]\.role': 'tool' is not system, user or assistant"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}], r"field 'messages\[1\]\.content' is empty"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 0}], r"field 'messages': every assistant reply has weight 0"),
    ([{"role": "user"}, {"role": "assistant", "content": "a"}], r"field 'messages\[0\]\.content' missing"),
])
def test_bad_messages_records(tmp_path, msgs, message):
    with pytest.raises(RayFTError, match=r"bad.jsonl: line 1: " + message):
        read_source(_write(tmp_path / "bad.jsonl", [{"messages": msgs}]))


def test_invalid_json_line_duplicate_ids_and_skip(tmp_path):
    path = tmp_path / "m.jsonl"
    good = json.dumps({"id": "x", **MESSAGES[0]})
    path.write_text(f"{good}\n{{oops\n\n{good}\n", encoding="utf-8")
    with pytest.raises(RayFTError, match=r"m.jsonl: line 2: invalid JSON at column 2"):
        read_source(str(path), "messages")
    data = read_source(str(path), "messages", on_error="skip")
    assert len(data.chats) == 1 and data.report.skipped_records == 2
    assert data.report.skipped_examples[1] == f"{path}: line 4 (id=x): duplicate id"


def test_groups_keep_copies_of_one_prompt_together(tmp_path):
    rows = [{"instruction": "same prompt", "output": f"answer {i}"} for i in range(3)]
    rows.append({"instruction": "other", "output": "o"})
    chats = read_source(_write(tmp_path / "g.jsonl", rows)).chats
    assert len({c.group for c in chats[:3]}) == 1 and chats[3].group != chats[0].group


def test_messages_render_with_default_system():
    conv = Conversation("c", "g", None, (Turn("u", "a"),))
    assert conv.messages("S")[0] == {"role": "system", "content": "S"}
    assert conv.messages()[0] == {"role": "user", "content": "u"}
