"""QA readers: SQuAD JSON, flat QA rows (CSV, JSONL, HF rows), answer checks, URIs."""

import json

import pytest

from ray_ft.data.qa import AnswerChecker, read_qa_rows
from ray_ft.data.readers import read_qa_source, read_source
from ray_ft.data.records import passage_id_of
from ray_ft.data.sources import Problems, ReadReport
from ray_ft.errors import RayFTError
from tests.conftest import CMRC, make_squad


def test_reads_records_with_all_answers_and_their_offsets(tmp_path):
    path = make_squad(tmp_path / "d.json", [
        ("北京是中国的首都。", [("q1", "中国的首都是哪里？", "北京")]),
        ("Paris is in France.", [("q2", "Where is Paris?", "France"), ("q3", "What is in France?", "Paris")]),
    ])
    data = read_source(str(path))
    recs = data.qa
    assert data.format == "squad" and data.chats is None
    assert [r.id for r in recs] == ["q1", "q2", "q3"]
    assert recs[0].answers == ("北京",) and recs[0].context == "北京是中国的首都。" and recs[0].answer_start == 0
    assert recs[1].answer_start == 12 and recs[2].answer_start == 0
    assert recs[1].passage_id == recs[2].passage_id == passage_id_of("Paris is in France.")
    assert recs[0].passage_id != recs[1].passage_id


def test_real_cmrc2018_dev_offsets_repaired_and_bad_references_dropped():
    data = read_source(str(CMRC))
    assert len(data.qa) == 3219 and len({r.passage_id for r in data.qa}) == 848
    # 200 references have answer_start -1: 7 are verbatim elsewhere in the passage (moved), 193
    # are not in it at all (dropped); every question keeps at least one reference.
    assert (data.report.answer_start_fixed, data.report.answers_dropped) == (7, 193)
    assert all(r.answers and r.context[r.answer_start:].startswith(r.answers[0]) for r in data.qa)
    with pytest.raises(RayFTError, match=r"qas\[\d+\] \(id=DEV_\d+_QUERY_\d+\): field 'answers\[\d\]"):
        read_source(str(CMRC), bad_answer="raise")


def _doc(qa, context="ctx"):
    return {"data": [{"paragraphs": [{"context": context, "qas": [qa]}]}]}


@pytest.mark.parametrize("content, expected", [
    ("{not json", r"invalid JSON at line 1 column 2"),
    ('{"version": 1}', r"cannot tell the format: expected SQuAD \{\"data\": \[...\]\}"),
    (json.dumps(_doc({"id": "a1", "question": "q?", "answers": []})),
     r"data\[0\]\.paragraphs\[0\]\.qas\[0\] \(id=a1\): field 'answers' is empty"),
    (json.dumps(_doc({"id": "a2", "question": "", "answers": [{"text": "x"}]})),
     r"\(id=a2\): field 'question' missing or empty"),
    (json.dumps(_doc({"question": "q?", "answers": [{"text": "x"}]})), r"qas\[0\]: field 'id' missing"),
    (json.dumps(_doc({"id": "a3", "question": "q?", "answers": [{"text": " "}]})),
     r"\(id=a3\): field 'answers\[0\]\.text' missing or empty"),
    (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), r"data\[0\]\.paragraphs\[0\]: field 'context'"),
    (json.dumps(_doc({"id": "a4", "question": "q?", "answers": [{"text": "zzz", "answer_start": 0}]})),
     r"\(id=a4\): field 'answers': no reference answer occurs in the context"),
])
def test_bad_records_name_file_record_and_field(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RayFTError, match=expected) as err:
        read_source(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_answer_start_checks_under_both_policies(tmp_path):
    ctx = "The river Nile is long. The Nile flows north."
    qa = {"id": "n1", "question": "Which river?", "answers": [
        {"text": "Nile", "answer_start": 3},     # wrong offset; the text is at 10 and 28
        {"text": "Amazon", "answer_start": 0},   # not in the passage at all
        {"text": "Nile", "answer_start": 28}]}   # right
    path = tmp_path / "s.json"
    path.write_text(json.dumps(_doc(qa, ctx)), encoding="utf-8")
    data = read_source(str(path))
    rec = data.qa[0]
    assert rec.answers == ("Nile", "Nile") and rec.answer_start == 10  # nearest occurrence to 3
    assert (data.report.answer_start_fixed, data.report.answers_dropped) == (1, 1)
    with pytest.raises(RayFTError, match=r"\(id=n1\): field 'answers\[0\]\.answer_start': 3 does not "
                                         r"point at the answer text \(it is at 10\)"):
        read_source(str(path), bad_answer="raise")


def test_skip_policy_counts_bad_records_and_keeps_their_messages(tmp_path):
    path = make_squad(tmp_path / "d.json", [("c1 text", [("ok", "q1?", "c1"), ("dup", "q2?", "text")]),
                                            ("c2 text", [("dup", "q3?", "c2")])])
    with pytest.raises(RayFTError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\] \(id=dup\): duplicate id"):
        read_source(str(path))
    data = read_source(str(path), on_error="skip")
    assert [r.id for r in data.qa] == ["ok", "dup"] and data.report.skipped_records == 1
    assert data.report.skipped_examples == [f"{path}: data[1].paragraphs[0].qas[0] (id=dup): duplicate id"]


def test_missing_empty_and_non_utf8_files(tmp_path):
    (tmp_path / "v.json").write_text('{"version": 1}', encoding="utf-8")
    with pytest.raises(RayFTError, match=r"v.json: field 'data' missing: expected SQuAD layout"):
        read_source(str(tmp_path / "v.json"), "squad")
    with pytest.raises(RayFTError, match="missing.json: file not found"):
        read_source(str(tmp_path / "missing.json"))
    (tmp_path / "empty.json").write_text("  \n", encoding="utf-8")
    with pytest.raises(RayFTError, match="empty.json: file is empty"):
        read_source(str(tmp_path / "empty.json"))
    raw = tmp_path / "latin1.json"
    raw.write_bytes(b'{"data": [\n"\xe9"]}')
    with pytest.raises(RayFTError, match=r"latin1.json: line 2: not UTF-8 text \(byte 12\)"):
        read_source(str(raw))


def test_qa_rows_from_csv_jsonl_and_hf_layout(tmp_path):
    csv_path = tmp_path / "fin.csv"
    csv_path.write_text('question,answer,context,ticker\nWhat grew?,"Revenue grew 5%.","Sales rose, '
                        'and revenue grew 5% in 2023.",X\nWho?,,ctx,Y\n', encoding="utf-8")
    with pytest.raises(RayFTError, match=r"fin.csv: line 3: field 'answer' missing or empty"):
        read_source(str(csv_path))
    data = read_source(str(csv_path), on_error="skip")
    rec = data.qa[0]
    assert data.format == "qa_rows" and rec.id == "line2" and rec.answers == ("Revenue grew 5%.",)
    assert rec.answer_start == -1  # abstractive: not a span of the context, and not checked

    jsonl = tmp_path / "qa.jsonl"
    jsonl.write_text(json.dumps({"id": "j1", "question": "Capital?", "context": "Paris is the capital.",
                                 "answers": ["Paris", "paris"]}) + "\n", encoding="utf-8")
    assert read_source(str(jsonl)).qa[0].answers == ("Paris", "paris")

    rows = [("row 0", {"id": "h1", "context": "上海在中国。", "question": "上海在哪里？",
                       "answers": {"text": ["中国"], "answer_start": [3]}}),
            ("row 1", {"id": "h2", "context": "c", "question": "q", "answers": {"text": []}})]
    report = ReadReport()
    recs = read_qa_rows("hf://cmrc2018:validation", rows, Problems("skip", report), AnswerChecker("repair", report))
    assert recs[0].answers == ("中国",) and recs[0].answer_start == 3 and report.skipped_records == 1
    assert report.skipped_examples == ["hf://cmrc2018:validation: row 1 (id=h2): field 'answers' is empty"]


def test_csv_row_with_extra_fields_is_a_record_error(tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("question,answer,context\nq1?,a,c a\nq2?,a,c,extra\n", encoding="utf-8")
    with pytest.raises(RayFTError, match=r"x.csv: line 3: 4 fields, the header has 3"):
        read_source(str(path))
    assert len(read_source(str(path), on_error="skip").qa) == 1
    # Blank lines are counted, and a quoted field may span lines: the error names the record's own line.
    path.write_text('question,answer,context\n\n"q1\nstill q1?",a,c a\n\nq2?,a,c,extra\n', encoding="utf-8")
    with pytest.raises(RayFTError, match=r"x.csv: line 6: 4 fields, the header has 3"):
        read_source(str(path))
    assert read_source(str(path), on_error="skip").qa[0].question == "q1\nstill q1?"


def test_file_uri_and_s3_uri_read_through_pyarrow(tmp_path, s3):
    path = make_squad(tmp_path / "d.json", [("Paris is in France.", [("q", "Where is Paris?", "France")])])
    assert read_qa_source(f"file://{path}") == read_qa_source(str(path))
    fs, query = s3
    fs.create_dir("qa-data")
    with fs.open_output_stream("qa-data/cmrc/d.json") as f:
        f.write(path.read_bytes())
    assert read_qa_source(f"s3://qa-data/cmrc/d.json{query}") == read_qa_source(str(path))
    with pytest.raises(RayFTError, match=r"^s3://qa-data/cmrc/none.json\?.*: file not found$"):
        read_source(f"s3://qa-data/cmrc/none.json{query}")


def test_hf_source_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RayFTError, match=r"^hf://no-such-dataset-xyz:validation: could not load"):
        read_source("hf://no-such-dataset-xyz:validation")


def test_hf_source_reads_rows_through_datasets_and_detects_their_format(tmp_path, monkeypatch):
    # A local folder is a dataset to `datasets.load_dataset` (split from the file name): the same
    # load + row conversion + format detection that hf://cmrc2018 takes online.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    qa_dir, chat_dir, trip_dir = (tmp_path / n for n in ("qa", "chat", "trip"))
    for folder, row in [
        (qa_dir, {"id": "h1", "context": "上海在中国。", "question": "上海在哪里？",
                  "answers": {"text": ["中国"], "answer_start": [3]}}),
        (chat_dir, {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}),
        (trip_dir, {"query": "q", "pos": ["p"], "neg": ["n"]}),
    ]:
        folder.mkdir()
        (folder / "validation.jsonl").write_text(json.dumps(row, ensure_ascii=False) + "\n", encoding="utf-8")

    qa = read_source(f"hf://{qa_dir}:validation")
    assert qa.format == "qa_rows" and [(r.id, r.answers, r.answer_start) for r in qa.qa] == [("h1", ("中国",), 3)]
    chat = read_source(f"hf://{chat_dir}")  # split defaults to validation
    assert chat.format == "messages" and [(t.user, t.assistant) for t in chat.chats[0].turns] == [("hi", "hello")]
    with pytest.raises(RayFTError, match=r"^hf://.*trip: embedding triplets are an `embed.source`"):
        read_source(f"hf://{trip_dir}")
