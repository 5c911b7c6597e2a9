"""A small fixed SFT set written as prepared shards (no Ray Data), shared by the SFT tests."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq

from ray_ft.data.packing import pack_table
from ray_ft.data.prepare import TRAIN_SCHEMA, PreparedData
from ray_ft.data.templates import build_prompt
from ray_ft.data.tokenize import tokenize_example

FACTS = [("北京是中国的首都。", "中国的首都是哪里？", "北京"),
         ("Paris is the capital of France.", "What is the capital of France?", "Paris"),
         ("The Nile flows through Egypt.", "Which river flows through Egypt?", "The Nile"),
         ("水在一百度沸腾。", "水在多少度沸腾？", "一百度")]
SYSTEM = "You are a helpful assistant."


def example_table(model_dir, repeats: int, facts=FACTS) -> pa.Table:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = {name: [] for name in TRAIN_SCHEMA.names}
    for r in range(repeats):
        for i, (ctx, q, a) in enumerate(facts):
            ex = tokenize_example(tok, SYSTEM, build_prompt(ctx, q, "en"), a)
            for k, v in (("id", f"{r}-{i}"), ("passage_id", str(i)), ("input_ids", ex.input_ids),
                         ("labels", ex.labels), ("num_tokens", len(ex.input_ids)), ("order", f"{r}-{i}")):
                rows[k].append(v)
    return pa.Table.from_pydict(rows, schema=TRAIN_SCHEMA)


def write_prepared(root, model_dir, repeats: int, packing_capacity: int | None = None,
                   val: str | None = None) -> PreparedData:
    """`repeats` x FACTS as 2 shards (packed into rows of `packing_capacity` tokens if given).
    val="right_answers": the 4 facts once more as the dev set; "wrong_answers": each question
    with the next fact's answer (a dev loss that training on the facts eventually raises)."""
    table = example_table(model_dir, repeats)
    rows = pack_table(table, packing_capacity) if packing_capacity else table
    (root / "train").mkdir(parents=True)
    half = rows.num_rows // 2
    pq.write_table(rows.slice(0, half), root / "train" / "0.parquet")
    pq.write_table(rows.slice(half), root / "train" / "1.parquet")
    if val:
        facts = FACTS if val == "right_answers" else \
            [(c, q, FACTS[(i + 1) % len(FACTS)][2]) for i, (c, q, _) in enumerate(FACTS)]
        dev = example_table(model_dir, 1, facts)
        dev = dev.append_column("context", pa.array([f[0] for f in facts]))
        dev = dev.append_column("answers", pa.array([[f[2]] for f in facts], type=pa.list_(pa.string())))
        pq.write_table(dev, root / "val.parquet")
    (root / "manifest.json").write_text(json.dumps({"train_examples": table.num_rows, "train_rows": rows.num_rows}))
    return PreparedData(root)
