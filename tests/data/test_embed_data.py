"""The embedding data stage on sources other than the Financial CSV: SQuAD JSON (real CMRC2018
passages) read by the SFT readers, answers kept in the triplets for LM-supervised retrieval."""

import json

import pytest

from ray_ft.config import parse_job
from ray_ft.data.embed_data import prepare_embedding_data
from ray_ft.errors import RayFTError


def test_squad_json_source_gives_split_triplets_with_answers(cmrc_slice, tmp_path):
    doc = json.loads(cmrc_slice.read_text(encoding="utf-8"))
    n_qas = sum(len(p["qas"]) for a in doc["data"] for p in a["paragraphs"])
    contexts = {p["context"] for a in doc["data"] for p in a["paragraphs"]}
    cfg = parse_job({"name": "cm", "task": "embedding", "embed": {
        "source": str(cmrc_slice), "neg_num": 3, "test_size": 0.2, "val_size": 0.1, "sentence_splitter": "。"}})
    data = prepare_embedding_data(cfg, tmp_path / "out")
    m = data.manifest
    assert m["pairs"] == n_qas and m["skipped_rows"] == 0
    assert m["train_pairs"] + m["test_pairs"] + len(data.val) <= n_qas and m["test_pairs"] > 0
    test_ctx, train_ctx = {p.context for p in data.test}, {t["pos"][0] for t in data.triplets}
    assert not test_ctx & train_ctx and (test_ctx | train_ctx) <= contexts  # split by passage
    # Every CMRC question has an answer span; the triplets keep it and it occurs in the passage.
    assert all(t["answer"] and t["answer"] in t["pos"][0] for t in data.triplets)
    assert all(len(t["neg"]) == 3 and t["pos"][0] not in t["neg"] for t in data.triplets)
    saved = [json.loads(line) for line in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert saved == data.triplets


def test_instruction_data_is_refused_as_an_embedding_source(tmp_path):
    src = tmp_path / "alpaca.json"
    src.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"}] * 4))
    cfg = parse_job({"name": "al", "task": "embedding", "embed": {"source": str(src)}})
    with pytest.raises(RayFTError, match="alpaca data has no passages"):
        prepare_embedding_data(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()
