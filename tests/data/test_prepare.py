import json

import pyarrow.parquet as pq
import pytest

from ray_ft.config import parse_job
from ray_ft.data.prepare import PreparedData, load_eval_records, prepare, reusable
from ray_ft.data.readers import read_source
from ray_ft.data.tokenize import IGNORE_INDEX
from ray_ft.errors import RayFTError
from tests.conftest import CMRC, FINQA


def _job(smollm_dir, tmp_path, **data):
    return parse_job({"name": "p", "output_dir": str(tmp_path / "runs"), "model": {"name": str(smollm_dir)},
                      "data": data})


@pytest.mark.slow
def test_prepare_writes_shards_eval_set_kb_and_manifest(ray_cluster, cmrc_slice, tmp_path, smollm_dir):
    (tmp_path / "extra.txt").write_text("额外的文档。第二句。", encoding="utf-8")
    (tmp_path / "copy.txt").write_text("额外的文档。第二句。\n", encoding="utf-8")  # the same document again
    cfg = _job(smollm_dir, tmp_path, source=str(cmrc_slice), max_samples=12, cutoff_len=1200, eval_size=0.25,
               num_shards=2, kb_sources=[str(tmp_path / "extra.txt"), str(tmp_path / "copy.txt")])
    prepared = prepare(cfg, tmp_path / "data")
    m = prepared.manifest()
    records = read_source(str(cmrc_slice)).qa
    assert m["records"] == len(records) and m["groups"] == 40 and m["heldout_passages"] == 10
    assert m["format"] == "squad" and m["read"]["records_read"] == len(records)

    table = pq.read_table(prepared.train_dir)
    shards = sorted(prepared.train_dir.glob("*.parquet"))
    assert len(shards) == 2 and table.num_rows == m["train_examples"] == 12
    rows = table.to_pylist()
    assert all(r["num_tokens"] == len(r["input_ids"]) <= 1200 for r in rows)
    assert m["train_tokens"] == sum(r["num_tokens"] for r in rows)
    for r in rows:  # the prompt is masked, the answer is not
        first = next(i for i, x in enumerate(r["labels"]) if x != IGNORE_INDEX)
        assert first > 50 and r["labels"][first:] == r["input_ids"][first:]
    # Statuses cover every training question; those that did not fit were shortened, not dropped.
    assert sum(m["statuses"].values()) == m["built_examples"] == m["train_questions"]
    assert m["shortened_context"] == m["statuses"].get("shortened_context", 0) > 0

    # The examples as built: messages records in training order, naming their passage.
    sft = [json.loads(line) for line in prepared.sft_file.read_text().splitlines()]
    assert [s["id"] for s in sft] == [r["id"] for r in rows]
    by_id = {r.id: r for r in records}
    for s, r in zip(sft, rows):
        assert s["context_ids"] == [r["passage_id"]] and s["messages"][-1]["content"] == by_id[s["id"]].answers[0]

    evals = load_eval_records(prepared, None)
    kb = [json.loads(line) for line in prepared.knowledge_base_file.read_text().splitlines()]
    train_passages = {r["passage_id"] for r in rows}
    assert {e["passage_id"] for e in evals} | {kb[-1]["passage_id"]} == {d["passage_id"] for d in kb}
    assert kb[-1]["text"] == "额外的文档。第二句。" and m["kb_source_documents"] == 2  # kept once
    assert len({d["passage_id"] for d in kb}) == len(kb) == m["knowledge_base_documents"] == 11
    assert train_passages.isdisjoint({e["passage_id"] for e in evals})
    assert len(evals) == m["heldout_questions"]
    # Questions of one passage are contiguous, so "the first N" keeps passages together.
    order = [e["passage_id"] for e in evals]
    assert order == sorted(order, key=order.index)
    # One node file per node group; the sentence group splits the extra document in two.
    nodes = {g: prepared.nodes_file(g).read_text().splitlines() for g in cfg.data.node_groups}
    assert {g: len(v) for g, v in nodes.items()} == m["nodes"] and m["nodes"]["passage"] == 11
    assert [json.loads(n)["text"] for n in nodes["sentence"][-2:]] == ["额外的文档。", "第二句。"]
    assert not list(tmp_path.glob(".data.*"))  # no temp folder left behind

    # Every file is in the manifest with its hash; a changed file makes the folder not reusable.
    assert set(m["files"]) >= {"sft_train.jsonl", "eval.jsonl", "knowledge_base.jsonl", "nodes/chunk.jsonl"}
    assert reusable(prepared, cfg)
    with prepared.eval_file.open("a") as f:
        f.write("\n")
    assert not reusable(prepared, cfg)
    assert not reusable(prepared, _job(smollm_dir, tmp_path, source=str(cmrc_slice), max_samples=13,
                                       cutoff_len=1200, eval_size=0.25, num_shards=2,
                                       kb_sources=[str(tmp_path / "extra.txt")]))


@pytest.mark.slow
def test_prepare_packs_rows_and_holds_out_a_dev_split(ray_cluster, cmrc_slice, tmp_path, smollm_dir):
    base = {"source": str(cmrc_slice), "max_samples": 24, "cutoff_len": 2048, "eval_size": 0.2,
            "dev_size": 0.2, "num_shards": 2}
    plain = prepare(_job(smollm_dir, tmp_path, **base), tmp_path / "plain")
    cfg = _job(smollm_dir, tmp_path, **base, packing=True, num_workers=2)
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

    # Same config and input -> byte-identical shards (2 build actors, seeded order kept).
    again = prepare(cfg, tmp_path / "again")
    read = lambda p: [f.read_bytes() for f in sorted(p.train_dir.glob("*.parquet"))]  # noqa: E731
    assert read(again) == read(packed) and again.val_file.read_bytes() == packed.val_file.read_bytes()
    assert again.manifest()["files"] == m["files"]


@pytest.mark.slow
def test_instruction_data_trains_without_an_eval_set(ray_cluster, tmp_path, smollm_dir):
    rows = [{"instruction": f"Say the number {i}", "output": f"{i}", "history": [["hi", "hello"]] if i % 2 else []}
            for i in range(40)]
    src = tmp_path / "alpaca.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = _job(smollm_dir, tmp_path, source=str(src), max_samples=None, eval_size=0.25, num_shards=1,
               sft_format="alpaca")
    radit = _job(smollm_dir, tmp_path, source=str(src), retrieval_augment={"enabled": True})
    with pytest.raises(RayFTError, match=r"alpaca.jsonl: data.retrieval_augment needs a QA source .* alpaca records"):
        prepare(radit, tmp_path / "radit")
    assert not (tmp_path / "radit").exists()
    prepared = prepare(cfg, cfg.run_dir / "data")
    m = prepared.manifest()
    assert m["format"] == "alpaca" and m["train_examples"] == 30 and m["test_conversations"] == 10
    test = [json.loads(line) for line in prepared.test_file.read_text().splitlines()]
    sft = [json.loads(line) for line in prepared.sft_file.read_text().splitlines()]
    assert {t["id"] for t in test}.isdisjoint({s["id"] for s in sft}) and len(test) == 10
    assert all(set(s) >= {"instruction", "output", "history"} for s in sft)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm_dir)
    by_id = {s["id"]: s for s in sft}
    for r in pq.read_table(prepared.train_dir).to_pylist():
        # Multi-turn rows train on every reply: the history's and the final one.
        trained = tok.decode([t for t in r["labels"] if t != IGNORE_INDEX])
        expected = [h[1] for h in by_id[r["id"]]["history"]] + [by_id[r["id"]]["output"]]
        assert trained.split() == [f"{e}<|im_end|>" for e in expected]
    assert not prepared.eval_file.exists()
    with pytest.raises(RayFTError, match="no QA eval set: data.source is instruction data"):
        load_eval_records(prepared, 5)
    # `ray-ft run` reuses the prepared folder and stops before training: nothing to evaluate on.
    from ray_ft.run import run_all

    stamp = prepared.manifest_file.stat().st_mtime_ns
    with pytest.raises(RayFTError, match=r"instruction data \(alpaca/messages\) with no QA eval set"):
        run_all(cfg)
    assert prepared.manifest_file.stat().st_mtime_ns == stamp and not (cfg.run_dir / "train").exists()


@pytest.mark.slow
def test_full_cmrc2018_dev_split(ray_cluster, tmp_path, smollm_dir):
    cfg = _job(smollm_dir, tmp_path, source=str(CMRC), max_samples=None, cutoff_len=1024, num_workers=2)
    m = prepare(cfg, tmp_path / "data").manifest()
    assert m["records"] == 3219 and m["groups"] == 848
    assert (m["read"]["answers_dropped"], m["read"]["answer_start_fixed"]) == (193, 7)
    assert m["train_questions"] + m["heldout_questions"] == 3219 and m["built_examples"] == m["train_questions"]
    # At 1,024 tokens about half the examples need a shorter context; none loses its answer.
    assert m["train_examples"] == m["train_questions"] - m["dropped_over_cutoff_len"] - m["dropped_answer_too_long"]
    assert m["shortened_context"] > 0.3 * m["train_questions"] and m["train_tokens_max"] <= 1024
    assert sum(m["token_length_histogram"].values()) == m["train_examples"]


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_full_financial_qa_10k_as_sft_data(ray_cluster, tmp_path, smollm_dir):
    cfg = _job(smollm_dir, tmp_path, source=str(FINQA), language="en", on_error="skip", max_samples=None,
               cutoff_len=512, eval_size=0.1, num_shards=2)
    prepared = prepare(cfg, tmp_path / "data")
    m = prepared.manifest()
    assert m["format"] == "qa_rows" and m["records"] == 6997 and m["read"]["skipped_records"] == 3
    assert m["read"]["skipped_examples"][0].endswith("line 1729: field 'answer' missing or empty")
    assert m["train_examples"] + m["dropped_over_cutoff_len"] + m["dropped_answer_too_long"] == m["train_questions"]
    assert m["train_examples"] > 6000 and m["heldout_passages"] > 600
    assert PreparedData(prepared.root).sft_file.read_text().count("\n") == m["train_examples"]


def test_config_hash_sees_edits_inside_a_knowledge_base_folder(tmp_path):
    from ray_ft.config import parse_job
    from ray_ft.data.prepare import data_config_hash

    kb = tmp_path / "kb"
    (kb / "sub").mkdir(parents=True)
    (kb / "a.md").write_text("first version")
    (kb / "sub" / "b.txt").write_text("another document")
    cfg = parse_job({"name": "kbhash", "data": {"source": str(tmp_path / "qa.json"), "kb_sources": [str(kb)]}})
    before = data_config_hash(cfg)
    assert data_config_hash(cfg) == before  # stable while nothing changes
    (kb / "a.md").write_text("second version")
    edited = data_config_hash(cfg)
    assert edited != before
    (kb / "sub" / "b.txt").rename(kb / "sub" / "c.txt")  # same bytes, another name
    assert data_config_hash(cfg) not in (before, edited)
