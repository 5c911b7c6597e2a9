"""Contrastive embedder training on Ray Train (2 workers, cross-device negatives), real MiniLM and
real Financial-QA rows; the saved folder loads in sentence-transformers with the same vectors."""

import json

import numpy as np
import pytest

from ray_ft.config import parse_job
from tests.conftest import FINQA, finqa_slice
from tests.train.faults import fail_once


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_embedding_job_two_workers_saves_a_loadable_model(ray_cluster, minilm_dir, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoTokenizer

    from ray_ft.run import run_all
    from ray_ft.train.embed import SentenceEncoder

    cfg = parse_job({
        "name": "embedtest", "task": "embedding", "output_dir": str(tmp_path / "runs"),
        "embed": {"source": str(finqa_slice(tmp_path / "qa.csv", 240)), "test_size": 0.2, "neg_num": 3,
                  "train_group_size": 2, "per_device_batch_size": 8, "max_steps": 4,
                  "learning_rate": 5e-5, "warmup_ratio": 0.0, "num_workers": 2, "cpus_per_worker": 1,
                  "grad_cache_chunk_size": 6, "passage_max_len": 128, "val_size": 0.1,
                  "eval_every_n_steps": 2, "keep_checkpoints": 1},
    })
    run = run_all(cfg)  # `ray-ft run` of a task: embedding job is its embed stage
    summary = run.embed
    assert run.skipped == [] and run.eval is None
    written = json.loads((tmp_path / "runs" / "embedtest" / "run_summary.json").read_text())
    assert written["embed"] == summary and "eval" not in written and "first_loss" not in written
    out = tmp_path / "runs" / "embedtest" / "embed"
    # The data stage's outputs: triplets + splits with a manifest, reused on the next call.
    from ray_ft.retriever_stages import stage_embed_data

    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert manifest["triplets"] == summary["triplets"] and manifest["negatives"] == "random"
    stamp = (out / "data" / "train.jsonl").stat().st_mtime_ns
    assert stage_embed_data(cfg).manifest == manifest and (out / "data" / "train.jsonl").stat().st_mtime_ns == stamp

    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    assert all(h["loss"] > 0 and h["tokens_per_s"] > 0 and 0 <= h["padding_ratio"] < 1 for h in history)
    assert summary["train_pairs"] + summary["val_pairs"] + summary["test_pairs"] == 240
    # Validation at steps 2 and 4; the exported model is the checkpoint with the better MRR.
    val = {h["step"]: h["val_mrr_at_10"] for h in history if "val_mrr_at_10" in h}
    assert sorted(val) == [2, 4]
    assert summary["exported_step"] == max(val, key=lambda s: (val[s], s))
    assert not (out / "model" / "trainer_state.pt").exists()  # optimizer state stays in checkpoints
    for side in ("before", "after"):
        r = summary[side]
        assert r["n_queries"] == summary["test_pairs"] and 0 <= r["mrr_at_10"] <= 1
        assert r["recall_at_1"] <= r["recall_at_5"]
    assert "| recall_at_5 |" in (out / "retrieval.md").read_text()
    again = run_all(cfg)  # finished and unchanged: skipped, the recorded summary returned
    assert again.skipped == ["embed"] and again.timings == {}
    assert again.embed["after"] == summary["after"] and again.embed["exported_step"] == summary["exported_step"]

    trained = SentenceTransformer(str(out / "model"), device="cpu")
    texts = ["What was Apple's revenue?", "Operating expenses rose in 2023."]
    st_vecs = trained.encode(texts, normalize_embeddings=True)
    enc = SentenceEncoder.build(str(out / "model"), "mean").eval()
    tok = AutoTokenizer.from_pretrained(out / "model")
    with torch.no_grad():
        ours = enc(dict(tok(texts, padding=True, return_tensors="pt"))).numpy()
    np.testing.assert_allclose(st_vecs, ours, atol=1e-5)  # the saved folder is the trained encoder
    base_vecs = SentenceTransformer(str(minilm_dir), device="cpu").encode(texts, normalize_embeddings=True)
    assert not np.allclose(base_vecs, st_vecs, atol=1e-4)  # training moved the weights

    # FlagEmbedding's FlagModel loads the same folder and returns the same vectors; its query
    # encoder adds the instruction the model was trained with.
    flag = pytest.importorskip("FlagEmbedding", reason="FlagEmbedding is installed by .ci/setup")
    fm = flag.FlagModel(str(out / "model"), pooling_method="mean", normalize_embeddings=True,
                        use_fp16=False, devices="cpu",
                        query_instruction_for_retrieval=cfg.embed.query_instruction)
    np.testing.assert_allclose(fm.encode(texts), st_vecs, atol=1e-5)
    np.testing.assert_allclose(fm.encode_queries(texts[:1]),
                               trained.encode([cfg.embed.query_instruction + texts[0]], normalize_embeddings=True),
                               atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_worker_failure_resumes_from_the_checkpoint_with_the_same_losses(ray_cluster, minilm_dir, tmp_path,
                                                                        monkeypatch):
    """Rank 0 dies after step 3; Ray Train restarts from the step-2 checkpoint (weights, optimizer,
    scheduler, data position, per-step seeds) and the loss curve equals an uninterrupted run's."""
    from ray_ft.data.triplets import build_triplets, read_qa_csv
    from ray_ft.train.embed import run_embed_training

    pairs, _ = read_qa_csv(finqa_slice(tmp_path / "qa.csv", 96))
    triplets = build_triplets(pairs, neg_num=3, seed=1)
    cfg = parse_job({
        "name": "resume", "task": "embedding", "output_dir": str(tmp_path / "runs"),
        "embed": {"neg_num": 3, "train_group_size": 2, "per_device_batch_size": 8, "max_steps": 5,
                  "learning_rate": 5e-5, "warmup_ratio": 0.0, "num_workers": 1, "cpus_per_worker": 2,
                  "passage_max_len": 64, "eval_every_n_steps": 2, "max_failures": 1},
    })
    clean = run_embed_training(cfg, triplets, minilm_dir, tmp_path / "clean")
    fail_once(monkeypatch, tmp_path / "failed" / ".failed_once", after_step=3, how="raise")
    failed = run_embed_training(cfg, triplets, minilm_dir, tmp_path / "failed")

    assert (tmp_path / "failed" / ".failed_once").is_file()  # the failure did happen
    assert [h["step"] for h in failed.history] == [1, 2, 3, 4, 5]
    assert [h["loss"] for h in failed.history] == pytest.approx([h["loss"] for h in clean.history], abs=1e-5)
    from safetensors.torch import load_file

    a = load_file(str(clean.model_dir / "model.safetensors"))
    b = load_file(str(failed.model_dir / "model.safetensors"))
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)
