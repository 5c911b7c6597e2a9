import json

import pytest

from ray_ft.data.squad import passage_id_of, read_qa_source, read_squad_json, records_from_hf_rows
from ray_ft.errors import RayFTError
from tests.conftest import CMRC, make_squad


def test_reads_records_with_all_answers(tmp_path):
    path = make_squad(tmp_path / "d.json", [
        ("北京是中国的首都。", [("q1", "中国的首都是哪里？", "北京")]),
        ("Paris is in France.", [("q2", "Where is Paris?", "France"), ("q3", "What is in France?", "Paris")]),
    ])
    recs = read_squad_json(path)
    assert [r.id for r in recs] == ["q1", "q2", "q3"]
    assert recs[0].answers == ("北京",) and recs[0].context == "北京是中国的首都。"
    assert recs[1].passage_id == recs[2].passage_id == passage_id_of("Paris is in France.")
    assert recs[0].passage_id != recs[1].passage_id


def test_real_cmrc2018_dev_counts():
    recs = read_qa_source(str(CMRC))
    assert len(recs) == 3219
    assert len({r.passage_id for r in recs}) == 848
    assert all(len(r.answers) >= 1 and r.answers[0] for r in recs)


def _doc(qa):
    return {"data": [{"paragraphs": [{"context": "ctx", "qas": [qa]}]}]}


@pytest.mark.parametrize("content, expected", [
    ("{not json", r"invalid JSON at line 1 column 2"),
    ('{"version": 1}', r"field 'data' missing"),
    (json.dumps(_doc({"id": "a1", "question": "q?", "answers": []})),
     r"data\[0\]\.paragraphs\[0\]\.qas\[0\] \(id=a1\): field 'answers' is empty"),
    (json.dumps(_doc({"id": "a2", "question": "", "answers": [{"text": "x"}]})),
     r"\(id=a2\): field 'question' missing or empty"),
    (json.dumps(_doc({"question": "q?", "answers": [{"text": "x"}]})), r"qas\[0\]: field 'id' missing"),
    (json.dumps(_doc({"id": "a3", "question": "q?", "answers": [{"text": " "}]})),
     r"\(id=a3\): field 'answers\[0\]\.text' missing or empty"),
    (json.dumps({"data": [{"paragraphs": [{"qas": []}]}]}), r"data\[0\]\.paragraphs\[0\]: field 'context'"),
])
def test_bad_records_name_file_record_and_field(tmp_path, content, expected):
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RayFTError, match=expected) as err:
        read_squad_json(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_duplicate_ids_missing_file_and_non_utf8(tmp_path):
    path = make_squad(tmp_path / "dup.json", [("c1", [("same", "q1?", "c")]), ("c2", [("same", "q2?", "c")])])
    with pytest.raises(RayFTError, match=r"data\[1\]\.paragraphs\[0\]\.qas\[0\] \(id=same\): duplicate id"):
        read_squad_json(path)
    with pytest.raises(RayFTError, match="missing.json: file not found"):
        read_squad_json(tmp_path / "missing.json")
    raw = tmp_path / "latin1.json"
    raw.write_bytes(b'{"data": ["\xe9"]}')
    with pytest.raises(RayFTError, match="not UTF-8 text"):
        read_squad_json(raw)


def test_hf_rows_layout_and_offline_error():
    rows = [{"id": "h1", "context": "上海在中国。", "question": "上海在哪里？",
             "answers": {"text": ["中国"], "answer_start": [3]}}]
    recs = records_from_hf_rows(rows, "hf://cmrc2018:validation")
    assert recs[0].answers == ("中国",) and recs[0].passage_id == passage_id_of("上海在中国。")
    with pytest.raises(RayFTError, match=r"hf://x: row 0 \(id=h2\).*'answers' is empty"):
        records_from_hf_rows([{"id": "h2", "context": "c", "question": "q", "answers": {"text": []}}], "hf://x")


def test_hf_source_offline_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(RayFTError, match=r"^hf://no-such-dataset-xyz:validation: could not load"):
        read_qa_source("hf://no-such-dataset-xyz:validation")
