"""One end-to-end run: prepare -> Ray Train LoRA -> Ray Serve (vLLM) -> evaluate, real models."""

import json

import pytest

from ray_ft.config import parse_job
from ray_ft.run import run_all
from tests.conftest import FINQA, finqa_slice


@pytest.mark.slow
def test_run_all_on_a_cmrc_slice(ray_cluster, cmrc_slice, tmp_path, smollm_dir, minilm_dir):
    cfg = parse_job({
        "name": "e2e", "output_dir": str(tmp_path / "runs"),
        "data": {"source": str(cmrc_slice), "max_samples": 6, "cutoff_len": 1024, "eval_size": 0.1,
                 "packing": True, "dev_size": 0.1},
        "train": {"max_steps": 6, "learning_rate": 3e-4, "eval_every_n_steps": 3, "val_max_examples": 2,
                  "val_generate_samples": 2, "val_max_new_tokens": 8},
        "serve": {"http_port": 8766, "max_tokens": 16},
        "eval": {"max_samples": 3, "concurrency": 4},
        "tracking": {"mlflow": {"enabled": True}},
    })
    summary = run_all(cfg)
    run = tmp_path / "runs" / "e2e"

    table = {(t["model"], t["mode"]): t for t in summary.eval}
    assert set(table) == {(m, d) for m in ("base", "finetuned") for d in ("gold", "retrieved")}
    for t in table.values():
        assert t["n"] == 3
        assert 0 <= t["em"] <= 1 and 0 <= t["cosine"] <= 1 and 0 <= t["origin"] <= 1
    assert table[("base", "retrieved")]["context_hit"] is not None

    rows = [json.loads(line) for line in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    assert {r["served_model"] for r in rows} == {"SmolLM2-135M-Instruct", "e2e"}
    assert all(r["prediction"].strip() for r in rows)  # every call returned an answer
    gold = [r for r in rows if r["mode"] == "gold"]
    evals = [json.loads(line) for line in (run / "data" / "eval.jsonl").read_text().splitlines()][:3]
    assert {r["id"] for r in gold} == {e["id"] for e in evals}
    assert all(r["context"] == next(e["context"] for e in evals if e["id"] == r["id"]) for r in gold)
    # Recomputing the summary from the per-item file gives the same numbers.
    em = sum(r["em"] for r in rows if r["model"] == "finetuned" and r["mode"] == "gold") / 3
    assert em == pytest.approx(table[("finetuned", "gold")]["em"])

    history = [json.loads(line) for line in (run / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 7))
    val = {h["step"]: h["val_loss"] for h in history if "val_loss" in h}  # SmolLM2 on the dev split
    assert sorted(val) == [3, 6] and all(0 < v < 10 for v in val.values())
    assert summary.exported_step == min(val, key=val.get)
    assert (run / "train" / "adapter" / "adapter_model.safetensors").is_file()
    md = (run / "eval" / "summary.md").read_text()
    assert md.startswith("### gold context (n = 3)") and "| metric | base | finetuned |" in md
    assert "![loss](loss.png)" in md and (run / "eval" / "loss.png").stat().st_size > 1000
    page = (run / "eval" / "report.html").read_text()  # the same run as a page: plots embedded, answers as data
    assert page.count("data:image/png;base64,") == 3 and '"questions":[' in page
    # The learning curve (validations at steps 3 and 6) is drawn by the train stage and linked.
    assert "![learning_curve](../train/learning_curve.png)" in md and "| 3 | " in md
    assert (run / "train" / "learning_curve.png").stat().st_size > 1000
    # On CPU the adapter is served merged into the base, and the report says so; a Chinese job
    # retrieves with BM25 by default, and the report says where the eval set came from.
    assert (run / "serve" / "merged" / "config.json").is_file()
    assert "finetuned: LoRA adapter merged into the base weights, on an engine of its own (vLLM, CPU)" in md
    assert "Eval set: 3 questions" in md and "held out of data.source by passage" in md and "top 1 by bm25" in md
    assert "Gain over base, gold context" in md and "% [" in md  # intervals
    ret = [r for r in rows if r["mode"] == "retrieved"]
    assert all(len(r["retrieved_texts"]) == 1 and r["gold_context"] for r in ret)  # top_k = 1
    assert table[("finetuned", "retrieved")]["context_recall"] == pytest.approx(
        sum(r["context_recall"] for r in ret if r["model"] == "finetuned") / 3)
    assert json.loads((run / "run_summary.json").read_text())["manifest"]["train_examples"] == 6

    # Re-running the finished job skips every stage (seconds, no Ray Train, no Serve) ...
    import time

    t = time.perf_counter()
    again = run_all(cfg)
    assert again.skipped == ["prepare", "train", "eval"] and time.perf_counter() - t < 20
    assert again.eval == summary.eval and again.exported_step == summary.exported_step
    # ... and changing an eval setting reruns only the eval stage (same adapter, same data).
    fewer = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_samples": 2})})
    third = run_all(fewer)
    assert third.skipped == ["prepare", "train"]
    assert {t["n"] for t in third.eval} == {2}
    assert json.loads((run / "stages.json").read_text())["train"]["outputs"]["exported_step"] == summary.exported_step
    _check_mlflow(tmp_path / "runs", summary, third)
    _check_required_pairs_stage(fewer, tmp_path)


def _check_required_pairs_stage(cfg, tmp_path):
    """A preference job that requires this finished job with pair mining switched on: running
    its requirement reruns nothing but the new pairs stage, which the trained adapter answers."""
    import yaml

    from ray_ft.config import load_job, write_resolved
    from ray_ft.data.preference import read_preference_source
    from ray_ft.run import required_jobs

    job_file = tmp_path / "dpo.yaml"
    job_file.write_text(yaml.safe_dump({
        "name": "dpo", "output_dir": str(tmp_path / "runs"), "train": {"method": "dpo", "preference": {
            "source": str(cfg.run_dir / "pairs" / "pairs.jsonl")}},
        "requires": [{"job": str(write_resolved(cfg).relative_to(tmp_path)), "overrides": [
            "train.preference.mining.enabled=true", "train.preference.mining.max_questions=4",
            "train.preference.mining.max_f1=1.0"]}]}))
    (sft,) = required_jobs(load_job(job_file))
    assert sft.run_dir == cfg.run_dir and sft.train.preference.mining.enabled
    mined = run_all(sft)
    assert mined.skipped == ["prepare", "train", "eval"]
    assert mined.pairs["questions"] == 4 and mined.pairs["answered_by"] == "e2e"
    pairs, _ = read_preference_source(str(cfg.run_dir / "pairs" / "pairs.jsonl"))
    held = {json.loads(line)["id"] for line in (cfg.run_dir / "data" / "eval.jsonl").read_text().splitlines()}
    assert len(pairs) == mined.pairs["pairs"] >= 1 and not {p.id.split("#")[0] for p in pairs} & held
    assert run_all(sft).skipped == ["prepare", "train", "eval", "pairs"]


def _check_mlflow(output_dir, summary, third):
    """Read the runs back through MLflow's client: the first config's run (continued, not
    duplicated, by the rerun that skipped everything) and the run of the changed eval config."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{output_dir / 'mlflow.db'}")
    runs = list(json.loads((output_dir / "e2e" / "tracking.json").read_text()).values())
    assert len(runs) == 2  # two configs: max_samples 3, then 2
    first, changed = (client.get_run(r["run_id"]) for r in runs)
    assert first.info.status == changed.info.status == "FINISHED"
    assert first.data.params["train.learning_rate"] == "0.0003" and first.data.params["eval.max_samples"] == "3"
    assert changed.data.params["eval.max_samples"] == "2"
    for run in (first, changed):  # the changed config's run gets the history of the train stage it skipped
        loss = client.get_metric_history(run.info.run_id, "train/loss")
        assert [m.step for m in loss] == list(range(1, 7))
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train/val/loss")] == [3, 6]
        assert run.data.tags["ray_ft.trained"].endswith("train/adapter")
        assert {f.path for f in client.list_artifacts(run.info.run_id, "eval")} >= {
            "eval/summary.md", "eval/summary.json", "eval/report.html", "eval/metrics.png"}
    for table, run in ((summary.eval, first), (third.eval, changed)):
        ft = next(t for t in table if (t["model"], t["mode"]) == ("finetuned", "gold"))
        assert run.data.metrics["eval/gold/finetuned/em"] == pytest.approx(ft["em"])
        assert run.data.metrics["eval/gold/finetuned/n"] == ft["n"]
    local = client.download_artifacts(first.info.run_id, "eval/summary.json")
    assert json.loads(open(local).read()) == summary.eval


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_run_with_an_embed_stage_serves_and_retrieves_with_the_fine_tuned_embedder(
        ray_cluster, tmp_path, smollm_dir, minilm_dir):
    """embed -> rerank -> prepare (retrieval-augmented with that embedder) -> train -> serve both ->
    evaluate with and without the reranker, on one Financial-QA slice; the embedder never trains
    on the passages the eval retrieves from."""
    import numpy as np

    from ray_ft.embedder import SentenceTransformerEmbedder

    src = finqa_slice(tmp_path / "qa.csv", 48)
    instruction = "Represent this sentence for searching relevant passages: "
    cfg = parse_job({
        "name": "e2e_embed", "output_dir": str(tmp_path / "runs"),
        "embed": {"enabled": True, "source": str(src), "test_size": 0.2, "neg_num": 2, "train_group_size": 2,
                  "per_device_batch_size": 4, "max_steps": 2, "val_size": 0.0, "learning_rate": 5e-4,
                  "passage_max_len": 128, "query_instruction": instruction},
        "data": {"source": str(src), "format": "qa_rows", "language": "en", "eval_size": 0.25, "max_samples": 4,
                 "cutoff_len": 512, "retrieval_augment": {"enabled": True, "top_k": 2, "separate_context": False}},
        "train": {"max_steps": 2, "tensorboard": False},
        "rerank": {"enabled": True, "train_group_size": 2, "per_device_batch_size": 4, "max_steps": 2,
                   "max_len": 96, "candidates": 3},
        "serve": {"http_port": 8767, "max_tokens": 8, "rerank": {"enabled": True, "candidates": 3, "cpus": 0.3}},
        "eval": {"max_samples": 3, "concurrency": 3, "modes": ["retrieved", "reranked"], "plots": False},
    })
    summary = run_all(cfg)
    run = tmp_path / "runs" / "e2e_embed"
    assert summary.skipped == [] and summary.embed["steps"] == 2 and summary.rerank["steps"] == 2
    assert summary.rerank["model_dir"] == cfg.finetuned_reranker_dir == cfg.served_reranker
    assert summary.embed["model_dir"] == cfg.finetuned_embedder_dir == cfg.serve.embedder

    # The eval's passages are not among the embedder's training passages (excluded, and counted).
    heldout = {json.loads(x)["context"].strip() for x in (run / "data" / "eval.jsonl").read_text().splitlines()}
    trained_on = {json.loads(x)["pos"][0].strip() for x in (run / "embed" / "data" / "train.jsonl").read_text().splitlines()}
    assert heldout and not heldout & trained_on
    assert json.loads((run / "embed" / "data" / "manifest.json").read_text())["excluded_sft_heldout_pairs"] > 0
    # The training examples were retrieved with the fine-tuned embedder.
    ra = summary.manifest["retrieval_augment"]
    assert (ra["embedder"], ra["query_instruction"]) == (cfg.finetuned_embedder_dir, instruction)

    # The served retriever embeds queries with the fine-tuned model and the instruction: its
    # scores are the cosines computed here with both, not the base model's.
    both = [json.loads(x) for x in (run / "eval" / "predictions.jsonl").read_text().splitlines()]
    rows = [r for r in both if r["mode"] == "retrieved"]
    assert len(rows) == 6 and all(r["retrieved_scores"][0] is not None for r in rows)
    # The reranked mode's passage is the one the job's reranker scores best of the 3 candidates,
    # and its score is that reranker's.
    from ray_ft.reranker import CrossEncoderReranker

    reranker = CrossEncoderReranker(cfg.finetuned_reranker_dir, max_len=cfg.serve.rerank.max_len)
    for r in (r for r in both if r["mode"] == "reranked"):
        assert r["retrieved_scores"][0] == pytest.approx(
            reranker.scores(r["question"], r["retrieved_texts"])[0], abs=1e-5)

    def cosines(model_dir, prefix):
        emb = SentenceTransformerEmbedder(str(model_dir))
        q = emb.embed([prefix + r["question"] for r in rows])
        p = emb.embed([r["retrieved_texts"][0] for r in rows])
        return np.sum(q * p, axis=1)

    served = np.array([r["retrieved_scores"][0] for r in rows])
    np.testing.assert_allclose(served, cosines(cfg.finetuned_embedder_dir, instruction), atol=1e-4)
    assert not np.allclose(served, cosines(minilm_dir, instruction), atol=1e-3)
    assert not np.allclose(served, cosines(cfg.finetuned_embedder_dir, ""), atol=1e-3)

    # Finished: every stage is skipped; an eval-only change reruns eval alone, not the embedder.
    again = run_all(cfg)
    assert again.skipped == ["embed", "rerank", "prepare", "train", "eval"] and again.embed == summary.embed
