"""Preference pairs: both record layouts read, every bad field a one-line error naming the record
(or skipped and counted), chosen == rejected refused, and the chat-template tokenization that
keeps the prompt once and both completions with their end of turn."""

from __future__ import annotations

import json

import pytest

from ray_ft.data.preference import PreferencePair, read_preference_source, tokenize_pair
from ray_ft.errors import RayFTError


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


GOOD = [
    {"id": "p1", "prompt": "Where does the Marren sail from?", "chosen": "Kelby harbour.", "rejected": "The moon."},
    {"messages": [{"role": "system", "content": "Answer briefly."},
                  {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                  {"role": "user", "content": "How much is a return ticket?"}],
     "chosen": [{"role": "assistant", "content": "12.50 pounds."}],
     "rejected": {"role": "assistant", "content": "Free."}},
]


def test_both_layouts_read_into_pairs(tmp_path):
    pairs, report = read_preference_source(_write(tmp_path / "p.jsonl", GOOD))
    assert report.records_read == 2 and report.format == "preference"
    a, b = pairs
    assert a == PreferencePair("p1", a.group, None, ({"role": "user", "content": "Where does the Marren sail from?"},),
                               "Kelby harbour.", "The moon.")
    assert b.id == "L2" and b.system == "Answer briefly." and [m["role"] for m in b.prompt] == ["user", "assistant", "user"]
    assert (b.chosen, b.rejected) == ("12.50 pounds.", "Free.")
    # the same prompt gives the same split group, whatever the replies
    again, _ = read_preference_source(_write(tmp_path / "q.jsonl", [{**GOOD[0], "id": "x", "chosen": "Kelby."}]))
    assert again[0].group == a.group != b.group


@pytest.mark.parametrize("record, message", [
    ({"prompt": "Q?", "chosen": "A.", "rejected": "  A. "}, "'chosen' and 'rejected' are the same reply"),
    ({"prompt": "Q?", "chosen": "A."}, "field 'rejected' missing or empty"),
    ({"prompt": "", "chosen": "A.", "rejected": "B."}, "field 'prompt' is empty"),
    ({"chosen": "A.", "rejected": "B."}, "field 'prompt' (or 'messages') missing"),
    ({"prompt": "Q?", "chosen": {"role": "user", "content": "A."}, "rejected": "B."}, "role must be assistant"),
    ({"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A."}],
      "chosen": "A.", "rejected": "B."}, "must end with a user turn"),
    ({"messages": [{"role": "assistant", "content": "Q?"}], "chosen": "A.", "rejected": "B."},
     "'messages[0].role': expected user"),
    ({"prompt": "Q?", "chosen": "A.", "rejected": "B.", "system": 3}, "field 'system' is not a string"),
])
def test_bad_records_name_file_line_id_and_field(tmp_path, record, message):
    path = _write(tmp_path / "p.jsonl", [GOOD[0], {"id": "bad7", **record}])
    with pytest.raises(RayFTError) as err:
        read_preference_source(path)
    text = str(err.value)
    assert text.startswith(f"{path}: line 2 (id=bad7): ") and message in text and "\n" not in text
    pairs, report = read_preference_source(path, on_error="skip")
    assert [p.id for p in pairs] == ["p1"] and report.skipped_records == 1 and message in report.skipped_examples[0]


def test_a_file_of_only_bad_records_is_an_error(tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "Q?", "chosen": "A.", "rejected": "A."}])
    with pytest.raises(RayFTError, match="no usable preference records"):
        read_preference_source(path, on_error="skip")


def test_tokenized_pair_shares_the_prompt_and_ends_each_reply_with_the_turn_end(tmp_path, smollm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    pairs, _ = read_preference_source(_write(tmp_path / "p.jsonl", GOOD))
    row = tokenize_pair(tok, pairs[1], "You are helpful.")
    prompt = tok.decode(row["prompt_ids"])
    # the record's own system prompt, the earlier turns as context, the header of the reply
    assert "Answer briefly." in prompt and "You are helpful." not in prompt and "Hello." in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tok.decode(row["chosen_ids"]) == "12.50 pounds.<|im_end|>\n"
    assert tok.decode(row["rejected_ids"]) == "Free.<|im_end|>\n"
    # the prompt is what the server renders for the same messages
    served = tok.apply_chat_template([{"role": "system", "content": "Answer briefly."}, *pairs[1].prompt],
                                     tokenize=False, add_generation_prompt=True)
    assert row["prompt_ids"] == tok(served, add_special_tokens=False)["input_ids"]
    default = tokenize_pair(tok, pairs[0], "You are helpful.")
    assert "You are helpful." in tok.decode(default["prompt_ids"])
