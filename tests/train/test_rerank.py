"""Cross-encoder reranker training on Ray Train with the real MiniLM and real Financial-QA rows:
training raises the dev MRR of reranked dense candidates above the fresh head's, the best
checkpoint is exported in the format FlagEmbedding reads, and a worker failure resumes with the
same losses."""

import json

import numpy as np
import pytest

from ray_ft.config import parse_job
from tests.conftest import FINQA, finqa_slice
from tests.train.faults import fail_once

needs_finqa = pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")


def _job(tmp_path, rows: int, **rerank):
    return parse_job({
        "name": "reranktest", "task": "rerank", "output_dir": str(tmp_path / "runs"), "data": {"language": "en"},
        "embed": {"source": str(finqa_slice(tmp_path / "qa.csv", rows)), "test_size": 0.2, "val_size": 0.15,
                  "neg_num": 7},
        "rerank": {"train_group_size": 4, "per_device_batch_size": 8, "max_len": 160, "candidates": 10,
                   "learning_rate": 5e-5, "warmup_ratio": 0.1, "num_workers": 1, "cpus_per_worker": 2, **rerank},
        "serve": {"retrieval": {"query_instruction": ""}},
    })


def _mrr(model_dir_or_model, groups, seed=None):
    from ray_ft.metrics.reranking import rank_metrics, reranked_orders
    from ray_ft.reranker import load_cross_encoder, pair_logits

    model, tok = load_cross_encoder(str(model_dir_or_model), seed=seed or 0)
    model.eval()
    orders = reranked_orders(groups, lambda q, texts: pair_logits(model, tok, [q] * len(texts), texts, 128))
    return rank_metrics(groups, orders)["mrr_at_10"]


@pytest.mark.slow
@needs_finqa
def test_training_raises_dev_mrr_and_exports_the_best_checkpoint(ray_cluster, minilm_dir, tmp_path):
    from ray_ft.metrics.reranking import CandidateGroup
    from ray_ft.run import run_all

    cfg = _job(tmp_path, 300, max_steps=16, eval_every_n_steps=8, keep_checkpoints=1, learning_rate=1e-4, max_len=128)
    run = run_all(cfg)
    summary = run.rerank
    out = tmp_path / "runs" / "reranktest" / "rerank"
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 17))
    assert all(h["loss"] > 0 and h["tokens_per_s"] > 0 and 0 < h["padding_ratio"] < 1 for h in history)
    val = {h["step"]: h["val_mrr_at_10"] for h in history if "val_mrr_at_10" in h}
    assert sorted(val) == [8, 16] and summary["exported_step"] == max(val, key=lambda s: (val[s], s))

    # The dev questions' dense candidates as the stage wrote them; the fresh head (same seed,
    # the weights training starts from) ranks them far worse than the exported reranker.
    groups = [CandidateGroup.from_dict(g) for g in map(json.loads, (out / "candidates" / "val.jsonl").open())]
    assert len(groups) == summary["val_queries"] >= 25 and all(len(g.candidates) == 10 for g in groups)
    fresh = _mrr(minilm_dir, groups, seed=cfg.rerank.seed)
    trained = _mrr(out / "model", groups)
    assert trained == pytest.approx(val[summary["exported_step"]], abs=1e-6)  # the export is that checkpoint
    assert trained > fresh + 0.15, (fresh, trained)
    first_loss = np.mean([h["loss"] for h in history[:4]])
    assert np.mean([h["loss"] for h in history[-4:]]) < first_loss < np.log(4) + 0.2  # ln(group) at chance

    test = summary["test"]
    assert test["dense"]["n_queries"] == summary["test_queries"] == test["dense + rerank"]["n_queries"]
    assert test["dense"]["candidate_recall"] == test["dense + rerank"]["candidate_recall"]  # same candidates
    assert "| dense + rerank |" in (out / "retrieval.md").read_text()
    assert run_all(cfg).skipped == ["rerank"]  # unchanged: not trained again

    # The exported folder is a one-logit sequence classifier: FlagEmbedding's FlagReranker reads it.
    from ray_ft.reranker import CrossEncoderReranker

    pairs = [(groups[0].query, c) for c in groups[0].candidates[:3]]
    ours = CrossEncoderReranker(str(out / "model"), max_len=128).logits(*map(list, zip(*pairs)))
    flag = pytest.importorskip("FlagEmbedding", reason="FlagEmbedding is installed by .ci/setup")
    theirs = flag.FlagReranker(str(out / "model"), use_fp16=False, devices="cpu", max_length=128)
    np.testing.assert_allclose(theirs.compute_score(pairs), ours, atol=1e-4)


@pytest.mark.slow
@needs_finqa
def test_worker_failure_resumes_from_the_checkpoint_with_the_same_losses(ray_cluster, minilm_dir, tmp_path,
                                                                        monkeypatch):
    """Rank 0 dies after step 3; Ray Train restarts from the step-2 checkpoint (weights, optimizer,
    scheduler, data position, the negatives each step draws) and the losses equal a clean run's."""
    from ray_ft.data.triplets import build_triplets, read_qa_csv
    from ray_ft.train.rerank import run_rerank_training

    pairs, _ = read_qa_csv(finqa_slice(tmp_path / "qa.csv", 96))
    triplets = build_triplets(pairs, neg_num=5, seed=1)
    cfg = _job(tmp_path, 96, max_steps=5, eval_every_n_steps=2, max_failures=1, max_len=96)
    clean = run_rerank_training(cfg, triplets, minilm_dir, tmp_path / "clean", [])
    fail_once(monkeypatch, tmp_path / "failed" / ".failed_once", after_step=3, how="raise")
    failed = run_rerank_training(cfg, triplets, minilm_dir, tmp_path / "failed", [])

    assert (tmp_path / "failed" / ".failed_once").is_file()  # the failure did happen
    assert [h["step"] for h in failed.history] == [1, 2, 3, 4, 5]
    assert failed.history[2].get("resumed_from_step") == 2
    assert [h["loss"] for h in failed.history] == pytest.approx([h["loss"] for h in clean.history], abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(clean.model_dir / "model.safetensors"))
    b = load_file(str(failed.model_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)
