"""Reader fuzzing (hypothesis): generated and mutated SQuAD JSON, QA CSV, JSONL (QA rows, Alpaca,
messages, preference pairs, embedding triplets) and documents (text, Markdown, HTML, PDF). Every
input either reads into well-formed records or fails with a one-line `RayFTError` that names the
file; never another exception type. Examples are derandomized (the same ones on every run) and
bounded, so the tests cost seconds in CI; inputs that once broke a reader stay as `@example`s.
`RAY_FT_FUZZ_EXAMPLES=5000 pytest tests/data/test_reader_fuzz.py` hunts longer, on fresh examples."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is a test extra (.ci/setup installs it)")
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ray_ft.errors import RayFTError  # noqa: E402

# RAY_FT_FUZZ_EXAMPLES=N: a longer hunt with fresh random examples (what bench runs use).
_HUNT = int(os.environ.get("RAY_FT_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=_HUNT or 150, derandomize=not _HUNT, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Any JSON value, and the values a field of a record plausibly gets wrong.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12)
texts = st.text(max_size=30) | st.sampled_from(["", " ", "Paris", "巴黎在法国。", "\x00", "\ud7ff", "a\nb"])
fields = texts | json_values


def _read(tmp: Path, name: str, data: bytes, read):
    """`read(path)` on `data` written to tmp/name: the records, or None after a RayFTError (one
    line, naming the file). Any other exception fails the test."""
    path = tmp / name
    path.write_bytes(data)
    try:
        return read(str(path))
    except RayFTError as err:
        msg = str(err)
        assert "\n" not in msg and str(path) in msg, msg
        return None


def _mutate(data: bytes, edits: list[tuple[int, int, int]]) -> bytes:
    """Byte edits (position, kind, byte): 0 = overwrite, 1 = insert, 2 = delete."""
    b = bytearray(data)
    for pos, kind, val in edits:
        if not b:
            break
        i = pos % len(b)
        if kind == 0:
            b[i] = val
        elif kind == 1:
            b.insert(i, val)
        else:
            del b[i]
    return bytes(b)


byte_edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), st.integers(0, 255)), min_size=1, max_size=8)


def _tmp() -> Path:
    return Path(tempfile.mkdtemp(prefix="ray_ft_fuzz_"))


# --- SFT sources (read_source) ---------------------------------------------------------------

def _check_source(data) -> None:
    if data is None:
        return
    for r in data.qa or []:
        assert isinstance(r.question, str) and r.question.strip() and isinstance(r.context, str)
        assert r.answers and all(isinstance(a, str) for a in r.answers)
    for c in data.chats or []:
        assert c.turns and all(isinstance(t.user, str) and isinstance(t.assistant, str) for t in c.turns)


def _read_source(on_error: str):
    from ray_ft.data.readers import read_source

    return lambda p: read_source(p, on_error=on_error)


squad_docs = st.fixed_dictionaries({"data": st.lists(st.fixed_dictionaries({"paragraphs": st.lists(
    st.fixed_dictionaries({"context": fields, "qas": st.lists(st.fixed_dictionaries({
        "id": fields, "question": fields,
        "answers": st.lists(st.fixed_dictionaries({"text": fields, "answer_start": fields}), max_size=2)}),
        max_size=2)}), max_size=2)}), max_size=2)}) | json_values


@FUZZ
@given(doc=squad_docs, on_error=st.sampled_from(["raise", "skip"]))
@example(doc={"data": [{"paragraphs": [{"context": "c", "qas": [  # found: an id with a newline broke the line
    {"id": "a\nb", "question": "", "answers": []}]}]}]}, on_error="raise")
@example(doc={"data": [{"paragraphs": [{"context": "Paris is in France.", "qas": [
    {"id": "q", "question": "Where?", "answers": [{"text": "France", "answer_start": 1e300}]}]}]}]}, on_error="raise")
def test_generated_squad_json_reads_or_names_the_record(doc, on_error):
    _check_source(_read(_tmp(), "squad.json", json.dumps(doc).encode(), _read_source(on_error)))


VALID_SQUAD = json.dumps({"version": "1.1", "data": [{"title": "t", "paragraphs": [
    {"context": "Paris is in France. 巴黎在法国。", "qas": [
        {"id": "q1", "question": "Where is Paris?", "answers": [{"text": "France", "answer_start": 12}]},
        {"id": "q2", "question": "巴黎在哪里?", "answers": [{"text": "法国", "answer_start": 23}]}]}]}]},
    ensure_ascii=False).encode()


@FUZZ
@given(edits=byte_edits, on_error=st.sampled_from(["raise", "skip"]))
def test_mutated_squad_bytes_read_or_name_the_file(edits, on_error):
    _check_source(_read(_tmp(), "squad.json", _mutate(VALID_SQUAD, edits), _read_source(on_error)))


def _read_jsonl(records: list, name: str, reader):
    """`records` as a JSONL file `name`, read by `reader(path)` (see `_read`)."""
    return _read(_tmp(), name, "\n".join(json.dumps(r) for r in records).encode(), reader)


message = st.fixed_dictionaries({"role": fields, "content": fields})
messages = st.lists(message, max_size=3) | fields
jsonl_records = st.lists(
    st.fixed_dictionaries({"question": fields, "context": fields, "answer": fields})
    | st.fixed_dictionaries({"instruction": fields, "input": fields, "output": fields})
    | st.fixed_dictionaries({"messages": messages})
    | json_values, min_size=1, max_size=4)


@FUZZ
@given(records=jsonl_records, on_error=st.sampled_from(["raise", "skip"]))
@example(records=[{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]}],
         on_error="raise")
def test_generated_jsonl_records_read_or_name_the_record(records, on_error):
    _check_source(_read_jsonl(records, "rows.jsonl", _read_source(on_error)))


VALID_CSV = ('question,context,answer\n"Where is Paris?","Paris is in France.",France\n'
             '"What rose?","Revenue rose 5% in 2023, to $3.1B.","Revenue"\n').encode()


@FUZZ
@given(edits=byte_edits, on_error=st.sampled_from(["raise", "skip"]))
def test_mutated_qa_csv_reads_or_names_the_line(edits, on_error):
    _check_source(_read(_tmp(), "rows.csv", _mutate(VALID_CSV, edits), _read_source(on_error)))


# --- preference pairs, embedding data --------------------------------------------------------

pair_records = st.lists(
    st.fixed_dictionaries({"prompt": fields, "chosen": fields, "rejected": fields})
    | st.fixed_dictionaries({"messages": messages, "chosen": fields | message, "rejected": fields})
    | json_values, min_size=1, max_size=4)


@FUZZ
@given(records=pair_records, on_error=st.sampled_from(["raise", "skip"]))
def test_generated_preference_pairs_read_or_name_the_record(records, on_error):
    from ray_ft.data.preference import read_preference_source

    got = _read_jsonl(records, "pairs.jsonl", lambda p: read_preference_source(p, on_error))
    if got is not None:
        for pair in got[0]:
            assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str) and pair.chosen != pair.rejected
            assert pair.prompt and all(isinstance(m["content"], str) for m in pair.prompt)


triplet_records = st.lists(
    st.fixed_dictionaries({"query": fields, "pos": st.lists(fields, max_size=2) | fields,
                           "neg": st.lists(fields, max_size=3) | fields})
    | json_values, min_size=1, max_size=4)


@FUZZ
@given(records=triplet_records, on_error=st.sampled_from(["raise", "skip"]))
def test_generated_triplets_read_or_name_the_record(records, on_error):
    from ray_ft.data.triplets import read_triplets_jsonl

    got = _read_jsonl(records, "triplets.jsonl", lambda p: read_triplets_jsonl(p, on_error))
    if got is not None:
        for t in got[0]:
            assert isinstance(t["query"], str) and t["pos"] and all(isinstance(x, str) for x in t["pos"] + t["neg"])


@FUZZ
@given(edits=byte_edits, on_error=st.sampled_from(["raise", "skip"]))
def test_mutated_embedding_csv_reads_or_names_the_line(edits, on_error):
    from ray_ft.data.triplets import read_qa_csv

    got = _read(_tmp(), "qa.csv", _mutate(VALID_CSV, edits), lambda p: read_qa_csv(p, on_error))
    if got is not None:
        assert all(isinstance(p.question, str) and isinstance(p.context, str) for p in got[0])


# --- documents ---------------------------------------------------------------------------------

def _parse(name: str):
    from ray_ft.data.documents import parse_document

    return lambda p: parse_document(p, name, Path(p).read_bytes())


def _check_document(doc) -> None:
    if doc is not None:
        assert doc.sections and all(isinstance(s.text, str) and s.text.strip() for s in doc.sections)


@FUZZ
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(str.encode),
       name=st.sampled_from(["a.txt", "a.md", "a.html"]))
@example(data=b"<html><body><table><tr><td>x", name="a.html")
@example(data=b"# \n```\n", name="a.md")
def test_generated_text_documents_parse_or_name_the_file(data, name):
    _check_document(_read(_tmp(), name, data, _parse(name)))


@pytest.fixture(scope="module")
def valid_pdf(tmp_path_factory) -> bytes:
    from tests.data.pdfs import write_pdf

    return write_pdf(tmp_path_factory.mktemp("pdf") / "a.pdf", ["Ferries leave Kelby at noon.", "Page two."]).read_bytes()


@FUZZ
@given(edits=byte_edits)
@example(edits=[(311, 0, 0)])  # found: /FlateDecode -> an unknown filter raised NotImplementedError
def test_mutated_pdf_bytes_parse_or_name_the_file(valid_pdf, edits):
    _check_document(_read(_tmp(), "a.pdf", _mutate(valid_pdf, edits), _parse("a.pdf")))
