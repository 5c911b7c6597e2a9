"""CSV QA reader (Financial-QA-10k layout) and embedding triplets."""

import json

import pytest

from ray_ft.data.triplets import DEFAULT_QUERY_PROMPT, build_triplets, read_qa_csv, split_pairs
from ray_ft.errors import RayFTError
from tests.conftest import FINQA


def _csv(tmp_path, text, name="qa.csv"):
    p = tmp_path / name
    p.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return p


def test_reader_names_file_line_and_field(tmp_path):
    ok = _csv(tmp_path, 'question,answer,context\nq1?,a1,"c1, with comma"\nq2?,a2,c2\n')
    pairs, skipped = read_qa_csv(ok)
    assert [(p.line, p.question, p.context) for p in pairs] == [(2, "q1?", "c1, with comma"), (3, "q2?", "c2")]
    assert skipped == 0

    empty_ctx = _csv(tmp_path, "question,answer,context\nq1?,a1,c1\nq2?,a2,  \n", "e.csv")
    with pytest.raises(RayFTError, match=r"e.csv: line 3: field 'context' is empty"):
        read_qa_csv(empty_ctx)
    pairs, skipped = read_qa_csv(empty_ctx, on_error="skip")
    assert len(pairs) == 1 and skipped == 1

    with pytest.raises(RayFTError, match=r"h.csv: header lacks column\(s\) \['context'\]"):
        read_qa_csv(_csv(tmp_path, "question,answer\nq,a\n", "h.csv"))
    with pytest.raises(RayFTError, match=r"b.csv: line 2: not UTF-8 text \(byte 19\)"):
        read_qa_csv(_csv(tmp_path, b"question,context\nq,\xff\xfe\n", "b.csv"))
    with pytest.raises(RayFTError, match=r"n.csv: no usable rows"):
        read_qa_csv(_csv(tmp_path, "question,context\n", "n.csv"))
    with pytest.raises(RayFTError, match="absent.csv: file not found"):
        read_qa_csv(tmp_path / "absent.csv")


def test_triplets_negatives_are_distinct_and_never_the_positive(tmp_path):
    rows = "".join(f"q{i}?,a,ctx{i % 7}\n" for i in range(30))
    pairs, _ = read_qa_csv(_csv(tmp_path, "question,answer,context\n" + rows))
    trips = build_triplets(pairs, neg_num=4, seed=1314)
    assert len(trips) == 30
    for t in trips:
        assert len(t["neg"]) == 4 and len(set(t["neg"])) == 4
        assert t["pos"][0] not in t["neg"] and t["prompt"] == DEFAULT_QUERY_PROMPT
    # Seeded and independent of input order.
    assert build_triplets(list(reversed(pairs)), 4, 1314) == trips
    assert build_triplets(pairs, 4, 7) != trips
    with pytest.raises(RayFTError, match="7 distinct contexts cannot give 7 negatives"):
        build_triplets(pairs, neg_num=7, seed=1)


@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_full_financial_qa_10k(tmp_path):
    # The real file has two bad rows: line 1735 (no question) and line 2733 (all fields empty).
    with pytest.raises(RayFTError, match=r"financial_qa_10k.csv: line 1735: field 'question' is empty"):
        read_qa_csv(FINQA)
    pairs, skipped = read_qa_csv(FINQA, on_error="skip")
    assert len(pairs) == 6998 and skipped == 2
    train, test = split_pairs(pairs, 0.1, 1314)
    assert len(train) + len(test) == 6998
    assert not {p.context for p in train} & {p.context for p in test}  # disjoint by passage
    assert 0.08 < len(test) / 6998 < 0.12
    trips = build_triplets(train, 10, 1314)
    assert all(t["pos"][0] not in t["neg"] and len(set(t["neg"])) == 10 for t in trips)
    json.dumps(trips[0])  # FlagEmbedding JSONL row
    # FlagEmbedding's keys, and the reference answer that LM-supervised retrieval scores.
    assert set(trips[0]) == {"query", "pos", "neg", "prompt", "answer"}
    assert len(trips) - 3 <= sum(bool(t.get("answer")) for t in trips) < len(trips)  # line 1729 has none


def test_triplet_jsonl_reader_roundtrip_and_errors(tmp_path):
    from ray_ft.data.triplets import pairs_of_triplets, read_triplets_jsonl
    from ray_ft.io import write_jsonl_atomic

    rows = "".join(f"q{i}?,a,ctx{i % 7}\n" for i in range(12))
    pairs, _ = read_qa_csv(_csv(tmp_path, "question,answer,context\n" + rows))
    trips = build_triplets(pairs, neg_num=3, seed=5)
    write_jsonl_atomic(tmp_path / "t.jsonl", trips)
    back, skipped = read_triplets_jsonl(tmp_path / "t.jsonl")
    assert [{k: v for k, v in t.items() if k != "line"} for t in back] == trips and skipped == 0
    assert [(p.line, p.question, p.context) for p in pairs_of_triplets(back)][:1] == [(1, trips[0]["query"], trips[0]["pos"][0])]

    good = json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "prompt": "x", "pos_scores": [1.0]})
    cases = [
        ("{not json", r"line 2: invalid JSON at column 2"),
        (json.dumps({"pos": ["p"], "neg": ["n"]}), r"line 2: field 'query' missing or empty"),
        (json.dumps({"query": "q", "pos": [], "neg": ["n"]}), r"line 2: field 'pos' missing or not a non-empty list"),
        (json.dumps({"query": "q", "pos": ["p"], "neg": ["n", ""]}), r"line 2: field 'neg' holds an empty"),
        (json.dumps({"query": "q", "pos": ["p"], "neg": ["p"]}), r"line 2: field 'neg' contains a positive"),
        (json.dumps({"query": "q", "pos": ["p", "p2"], "neg": ["p2"]}), r"line 2: field 'neg' contains a positive"),
        (json.dumps({"query": "q", "pos": ["p"], "neg": ["n"], "neg_scores": [0.1, 0.2]}),
         r"line 2: field 'neg_scores' must be a list as long as 'neg'"),
        ("[1, 2]", r"line 2: line is not a JSON object"),
    ]
    for bad, msg in cases:
        f = _csv(tmp_path, good + "\n" + bad + "\n", "bad.jsonl")
        with pytest.raises(RayFTError, match=r"bad.jsonl: " + msg):
            read_triplets_jsonl(f)
        got, skipped = read_triplets_jsonl(f, on_error="skip")
        assert len(got) == 1 and skipped == 1 and got[0]["pos_scores"] == [1.0]
    with pytest.raises(RayFTError, match="e.jsonl: file is empty"):
        read_triplets_jsonl(_csv(tmp_path, "\n", "e.jsonl"))
    with pytest.raises(RayFTError, match="n.jsonl: no usable triplets"):
        read_triplets_jsonl(_csv(tmp_path, "[1]\n", "n.jsonl"), on_error="skip")
    with pytest.raises(RayFTError, match="u.jsonl: line 1: not UTF-8 text"):
        read_triplets_jsonl(_csv(tmp_path, b'{"query": "\xff"}\n', "u.jsonl"))
