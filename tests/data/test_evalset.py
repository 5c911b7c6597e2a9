"""A separate eval set (`eval.source`): every training record trains, the eval questions come from
the other file, leakage between the two is counted and handled, bad eval records follow
`data.on_error`, the knowledge base holds the eval passages, and reuse follows both files."""

import json

import pytest

from ray_ft.config import load_job, parse_job
from ray_ft.data.evalset import check_leakage, normalized, read_eval_source
from ray_ft.data.prepare import data_config_hash, load_eval_records, load_knowledge_base, prepare, reusable
from ray_ft.data.records import QARecord, passage_id_of
from ray_ft.errors import RayFTError


def _rec(qid: str, context: str, question: str, answer: str = "甲") -> QARecord:
    return QARecord(qid, passage_id_of(context), context, question, (answer,), context.find(answer))


def test_leakage_is_exact_after_whitespace_normalisation_and_follows_the_policy():
    train = [_rec("t1", "北京是中国的首都。", "中国的首都是哪里？"), _rec("t2", "水在一百度沸腾。", "水在多少度沸腾？")]
    held = [_rec("e1", "  北京是中国的首都。\n", "首都在哪？"),  # a training passage, other whitespace
            _rec("e2", "长江很长。", "水在多少度沸腾？ "),     # a training question over a new passage
            _rec("e3", "长江很长。", "什么很长？"),             # new passage, new question
            _rec("e4", "北京是中国的 首都。", "首都？")]        # inner whitespace differs: not the same text
    assert normalized(" a \n b\t c ") == "a b c"
    kept, leak = check_leakage(train, held, "drop", "train.json", "test.json")
    assert [r.id for r in kept] == ["e3", "e4"]
    assert (leak.shared_passages, leak.shared_questions, leak.affected_questions, leak.dropped_questions) == (1, 1, 2, 2)
    kept, leak = check_leakage(train, held, "warn", "train.json", "test.json")
    assert len(kept) == 4 and leak.dropped_questions == 0 and leak.affected_questions == 2
    with pytest.raises(RayFTError) as err:
        check_leakage(train, held, "error", "train.json", "test.json")
    msg = str(err.value)
    assert msg.startswith("test.json: the eval set shares 1 passage(s) and 1 question(s) with the training data "
                          "train.json") and "\n" not in msg
    clean, leak = check_leakage(train, held[2:], "error", "train.json", "test.json")
    assert len(clean) == 2 and leak.affected_questions == 0
    with pytest.raises(RayFTError, match="every eval question shares a passage or a question"):
        check_leakage(train, held[:2], "drop", "train.json", "test.json")


def test_eval_source_resolves_against_the_job_file_and_must_hold_qa_records(tmp_path):
    (tmp_path / "jobs").mkdir()
    (tmp_path / "data").mkdir()
    alpaca = tmp_path / "data" / "chat.jsonl"
    alpaca.write_text(json.dumps({"instruction": "hi", "output": "hello"}) + "\n", encoding="utf-8")
    job = tmp_path / "jobs" / "j.yaml"
    job.write_text("name: j\neval:\n  source: ../data/chat.jsonl\n", encoding="utf-8")
    cfg = load_job(job)
    assert cfg.eval.source == str(alpaca)
    with pytest.raises(RayFTError, match=r"chat.jsonl: eval.source holds alpaca records; an eval set needs QA records"):
        read_eval_source(cfg)
    with pytest.raises(RayFTError, match="field 'eval.format'"):
        parse_job({"name": "j", "eval": {"source": "x.json", "format": "alpaca"}})
    with pytest.raises(RayFTError, match="field 'eval.leakage'"):
        parse_job({"name": "j", "eval": {"source": "x.json", "leakage": "ignore"}})
    # Without eval.source the data hash does not see the eval-set fields (existing runs keep theirs).
    plain = parse_job({"name": "j", "data": {"source": str(alpaca)}})
    other = parse_job({"name": "j", "data": {"source": str(alpaca)}, "eval": {"leakage": "error"}})
    assert data_config_hash(plain) == data_config_hash(other)


def _files(tmp_path, cmrc_slice):
    """Training data: the slice's first 20 passages; eval set: 4 other passages, one training
    passage with changed whitespace, one training question over a new passage, one bad record."""
    doc = json.loads(cmrc_slice.read_text(encoding="utf-8"))
    paras = [p for a in doc["data"] for p in a["paragraphs"]]
    train = tmp_path / "train.json"
    train.write_text(json.dumps({"data": [{"paragraphs": paras[:20]}]}, ensure_ascii=False), encoding="utf-8")
    fresh = paras[30:34]
    leaked = dict(paras[3], context="\n " + paras[3]["context"] + "  ", qas=[
        {**qa, "id": f"L{k}", "answers": [{"text": a["text"], "answer_start": a["answer_start"] + 2}
                                           for a in qa["answers"]]} for k, qa in enumerate(paras[3]["qas"])])
    q = paras[5]["qas"][0]["question"]
    same_question = {"context": "北京是中国的首都。", "qas": [{"id": "Q1", "question": q,
                                                             "answers": [{"text": "北京", "answer_start": 0}]}]}
    bad = {"context": "长江是中国最长的河。", "qas": [{"id": "B1", "question": "最长的河？", "answers": []}]}
    test = tmp_path / "test.json"
    test.write_text(json.dumps({"data": [{"paragraphs": [*fresh, leaked, same_question, bad]}]}, ensure_ascii=False),
                    encoding="utf-8")
    n_fresh = sum(len(p["qas"]) for p in fresh)
    return train, test, n_fresh, len(leaked["qas"]), sum(len(p["qas"]) for p in paras[:20])


@pytest.mark.slow
def test_a_separate_eval_set_trains_on_all_of_data_source(ray_cluster, cmrc_slice, tmp_path, smollm_dir):
    train, test, n_fresh, n_leaked, n_train = _files(tmp_path, cmrc_slice)
    (tmp_path / "notes.txt").write_text("另一份文档。", encoding="utf-8")

    def job(**eval_):
        return parse_job({"name": "sep", "output_dir": str(tmp_path / "runs"), "model": {"name": str(smollm_dir)},
                          "data": {"source": str(train), "max_samples": None, "cutoff_len": 512, "eval_size": 0.5,
                                   "num_shards": 1, "on_error": "skip", "kb_sources": [str(tmp_path / "notes.txt")]},
                          "eval": {"source": str(test), **eval_}})

    # The leaked passage brings its training questions along: n_leaked + 1 shared questions.
    with pytest.raises(RayFTError, match=rf"test.json: the eval set shares 1 passage\(s\) and {n_leaked + 1} "
                                         r"question\(s\) with the training data .*train.json"):
        prepare(job(leakage="error"), tmp_path / "error")
    assert not (tmp_path / "error").exists()  # nothing half-written

    cfg = job()
    prepared = prepare(cfg, cfg.run_dir / "data")
    m = prepared.manifest()
    # No eval_size split: every training question trains (eval_size 0.5 would have held out half).
    assert m["records"] == m["train_questions"] == n_train and m["built_examples"] == n_train
    ev = m["eval_set"]
    assert ev["source"] == str(test) and ev["format"] == "squad"
    assert ev["read"]["skipped_records"] == 1 and "id=B1" in ev["read"]["skipped_examples"][0]
    assert ev["leakage"] == {"policy": "drop", "shared_passages": 1, "shared_questions": n_leaked + 1,
                             "affected_questions": n_leaked + 1, "dropped_questions": n_leaked + 1}
    evals = load_eval_records(prepared, None)
    assert len(evals) == m["heldout_questions"] == n_fresh and not any(e["id"].startswith(("L", "Q", "B")) for e in evals)
    # The knowledge base: the eval set's passages plus the kb_sources document.
    kb = load_knowledge_base(prepared)
    assert {d["passage_id"] for d in kb} == {e["passage_id"] for e in evals} | {kb[-1]["passage_id"]}
    assert kb[-1]["text"] == "另一份文档。" and m["heldout_passages"] == 4

    # Reuse: unchanged files reuse the folder; an edit of the eval file (or its policy) does not.
    assert reusable(prepared, cfg) and not reusable(prepared, job(leakage="warn"))
    test.write_text(test.read_text(encoding="utf-8").replace("最长的河？", "最长的河是哪条？"), encoding="utf-8")
    assert not reusable(prepared, cfg)
    warned = prepare(job(leakage="warn"), tmp_path / "warn").manifest()
    assert warned["heldout_questions"] == n_fresh + n_leaked + 1 and warned["eval_set"]["leakage"]["dropped_questions"] == 0
