import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from safetensors import safe_open

from ray_ft.config import TrainConfig, parse_job
from ray_ft.data.prepare import TRAIN_SCHEMA, PreparedData
from ray_ft.data.templates import build_prompt
from ray_ft.data.tokenize import IGNORE_INDEX, tokenize_example
from ray_ft.train.sft import pad_collate, run_training, steps_per_epoch, total_steps

FACTS = [("北京是中国的首都。", "中国的首都是哪里？", "北京"),
         ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
         ("The Nile flows through Egypt.", "Which river flows through Egypt?", "The Nile"),
         ("水在一百度沸腾。", "水在多少度沸腾？", "一百度")]


def test_pad_collate_pads_right_and_masks():
    batch = {"input_ids": np.array([[1, 2, 3], [4]], dtype=object),
             "labels": np.array([[IGNORE_INDEX, 2, 3], [4]], dtype=object)}
    out = pad_collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_step_arithmetic():
    t = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1.5)
    assert steps_per_epoch(9, t) == 3  # 5 micro-batches -> 3 optimizer steps
    assert total_steps(9, t) == 5
    assert total_steps(9, TrainConfig(max_steps=7)) == 7


def _prepared(tmp_path, model_dir, repeats: int) -> PreparedData:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = {name: [] for name in TRAIN_SCHEMA.names}
    for r in range(repeats):
        for i, (ctx, q, a) in enumerate(FACTS):
            ex = tokenize_example(tok, "You are a helpful assistant.", build_prompt(ctx, q, "en"), a)
            for k, v in (("id", f"{r}-{i}"), ("passage_id", str(i)), ("input_ids", ex.input_ids),
                         ("labels", ex.labels), ("num_tokens", len(ex.input_ids)), ("order", f"{r}-{i}")):
                rows[k].append(v)
    root = tmp_path / "data"
    (root / "train").mkdir(parents=True)
    table = pa.Table.from_pydict(rows, schema=TRAIN_SCHEMA)
    half = table.num_rows // 2
    pq.write_table(table.slice(0, half), root / "train" / "0.parquet")
    pq.write_table(table.slice(half), root / "train" / "1.parquet")
    (root / "manifest.json").write_text(json.dumps({"train_examples": table.num_rows}))
    return PreparedData(root)


@pytest.mark.slow
def test_lora_ddp_two_workers_reduces_loss_and_saves_only_the_adapter(ray_cluster, tiny_model_dir, tmp_path):
    prepared = _prepared(tmp_path, tiny_model_dir, repeats=6)  # 24 examples, 12 per worker
    cfg = parse_job({"name": "t", "model": {"name": str(tiny_model_dir)}, "train": {
        "num_workers": 2, "cpus_per_worker": 1, "learning_rate": 3e-2, "num_train_epochs": 4,
        "per_device_train_batch_size": 2, "lora_rank": 8, "lr_scheduler_type": "constant"}})
    result = run_training(cfg, prepared, tiny_model_dir, tmp_path / "train")

    steps = [h["step"] for h in result.history]
    assert steps == list(range(1, 25))  # 12 per worker / batch 2 = 6 steps per epoch, 4 epochs
    first = np.mean([h["loss"] for h in result.history[:2]])
    last = np.mean([h["loss"] for h in result.history[-2:]])
    assert last < 0.8 * first, (first, last)
    h = result.history[-1]
    assert h["tokens_per_s"] > 0 and 0 <= h["padding_ratio"] < 1 and h["peak_mem_mb"] > 100
    assert h["lr"] == pytest.approx(3e-2)

    weights = result.adapter_dir / "adapter_model.safetensors"
    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    # "all" linear layers: q,k,v,o,gate,up,down in each of the 2 layers, A and B each.
    assert len(keys) == 2 * 7 * 2
    adapter_cfg = json.loads((result.adapter_dir / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert [json.loads(line)["step"] for line in result.metrics_file.read_text().splitlines()] == steps

