import json

import pyarrow.parquet as pq
import pytest

from ray_ft.config import parse_job
from ray_ft.data.prepare import load_eval_records, prepare
from ray_ft.data.squad import read_squad_json
from ray_ft.data.tokenize import IGNORE_INDEX


@pytest.mark.slow
def test_prepare_writes_shards_eval_set_and_kb(ray_cluster, cmrc_slice, tmp_path, smollm_dir):
    cfg = parse_job({"name": "p", "model": {"name": str(smollm_dir)},
                     "data": {"source": str(cmrc_slice), "max_samples": 12, "cutoff_len": 1200,
                              "val_size": 0.25, "num_shards": 2}})
    prepared = prepare(cfg, tmp_path / "data")
    m = prepared.manifest()
    records = read_squad_json(cmrc_slice)
    assert m["records"] == len(records) and m["passages"] == 40 and m["heldout_passages"] == 10

    table = pq.read_table(prepared.train_dir)
    shards = sorted(prepared.train_dir.glob("*.parquet"))
    assert len(shards) == 2 and table.num_rows == m["train_examples"] == 12
    rows = table.to_pylist()
    assert all(r["num_tokens"] == len(r["input_ids"]) <= 1200 for r in rows)
    assert m["train_tokens"] == sum(r["num_tokens"] for r in rows)
    for r in rows:  # the prompt is masked, the answer is not
        first = next(i for i, x in enumerate(r["labels"]) if x != IGNORE_INDEX)
        assert first > 50 and r["labels"][first:] == r["input_ids"][first:]

    evals = load_eval_records(prepared, None)
    kb = [json.loads(line) for line in prepared.knowledge_base_file.read_text().splitlines()]
    train_passages = {r["passage_id"] for r in rows}
    assert {e["passage_id"] for e in evals} == {d["passage_id"] for d in kb}
    assert train_passages.isdisjoint({e["passage_id"] for e in evals})
    assert len(evals) == m["heldout_questions"]
    # Questions of one passage are contiguous, so "the first N" keeps passages together.
    order = [e["passage_id"] for e in evals]
    assert order == sorted(order, key=order.index)
    assert not list(tmp_path.glob(".data.*"))  # no temp folder left behind

    # Same config and input -> the same selection of training examples.
    again = pq.read_table(prepare(cfg, tmp_path / "data2").train_dir)
    assert sorted(again.column("id").to_pylist()) == sorted(table.column("id").to_pylist())


@pytest.mark.slow
def test_prepare_packs_rows_and_holds_out_a_dev_split(ray_cluster, cmrc_slice, tmp_path, smollm_dir):
    base = {"source": str(cmrc_slice), "max_samples": 24, "cutoff_len": 2048, "val_size": 0.2,
            "dev_size": 0.2, "num_shards": 2}
    plain = prepare(parse_job({"name": "p", "model": {"name": str(smollm_dir)}, "data": base}), tmp_path / "plain")
    cfg = parse_job({"name": "p", "model": {"name": str(smollm_dir)}, "data": {**base, "packing": True}})
    packed = prepare(cfg, tmp_path / "packed")
    m = packed.manifest()

    examples = {r["id"]: r for r in pq.read_table(plain.train_dir).to_pylist()}
    rows = pq.read_table(packed.train_dir).to_pylist()
    assert m["train_examples"] == 24 and m["train_rows"] == len(rows) < 24
    assert sorted(i for r in rows for i in r["ids"]) == sorted(examples)  # each example once
    for r in rows:
        assert r["num_tokens"] == len(r["input_ids"]) <= 2048
        members = [examples[i] for i in r["ids"]]
        assert r["input_ids"] == [t for e in members for t in e["input_ids"]]
        assert r["position_ids"] == [p for e in members for p in range(len(e["input_ids"]))]
        # Unmasked labels are exactly the members' answer tokens (each example's first label is
        # masked anyway: it is a prompt token).
        trained = [t for t in r["labels"] if t != IGNORE_INDEX]
        assert trained == [t for e in members for t in e["labels"] if t != IGNORE_INDEX]
    assert m["fill_ratio_batch8"] > plain.manifest()["fill_ratio_batch8"]
    assert sum(m["token_length_histogram"].values()) == 24

    # The dev split: its own passages, tokenized, with context and answers for generation.
    dev = pq.read_table(packed.val_file).to_pylist()
    assert m["dev_questions"] == len(dev) > 0
    evals = load_eval_records(packed, None)
    dev_passages = {d["passage_id"] for d in dev}
    assert dev_passages.isdisjoint({e["passage_id"] for e in examples.values()})
    assert dev_passages.isdisjoint({e["passage_id"] for e in evals})
    assert all(d["answers"] and d["answers"][0] in d["context"] for d in dev)

    # Same config and input -> byte-identical shards.
    again = prepare(cfg, tmp_path / "again")
    read = lambda p: [f.read_bytes() for f in sorted(p.train_dir.glob("*.parquet"))]  # noqa: E731
    assert read(again) == read(packed) and again.val_file.read_bytes() == packed.val_file.read_bytes()
