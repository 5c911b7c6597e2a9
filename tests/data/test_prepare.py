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
