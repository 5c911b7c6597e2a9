"""One end-to-end run: prepare -> Ray Train LoRA -> Ray Serve (vLLM) -> evaluate, real models."""

import json

import pytest

from ray_ft.config import parse_job
from ray_ft.pipeline import run_all


@pytest.mark.slow
def test_run_all_on_a_cmrc_slice(ray_cluster, cmrc_slice, tmp_path, smollm_dir, minilm_dir):
    cfg = parse_job({
        "name": "e2e", "output_dir": str(tmp_path / "runs"),
        "data": {"source": str(cmrc_slice), "max_samples": 6, "cutoff_len": 1024, "val_size": 0.1,
                 "packing": True, "dev_size": 0.1},
        "train": {"max_steps": 6, "learning_rate": 3e-4, "eval_every_n_steps": 3, "val_max_examples": 2,
                  "val_generate_samples": 2, "val_max_new_tokens": 8},
        "serve": {"http_port": 8766, "max_tokens": 16},
        "eval": {"max_samples": 3, "concurrency": 4},
    })
    summary = run_all(cfg)
    run = tmp_path / "runs" / "e2e"

    table = {(t["model"], t["mode"]): t for t in summary["eval"]}
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
    assert summary["exported_step"] == min(val, key=val.get)
    assert (run / "train" / "adapter" / "adapter_model.safetensors").is_file()
    md = (run / "eval" / "summary.md").read_text()
    assert md.startswith("### gold context (n = 3)") and "| metric | base | finetuned |" in md
    assert "![loss](loss.png)" in md and (run / "eval" / "loss.png").stat().st_size > 1000
    ret = [r for r in rows if r["mode"] == "retrieved"]
    assert all(len(r["retrieved_texts"]) == 1 and r["gold_context"] for r in ret)  # top_k = 1
    assert table[("finetuned", "retrieved")]["context_recall"] == pytest.approx(
        sum(r["context_recall"] for r in ret if r["model"] == "finetuned") / 3)
    assert json.loads((run / "run_summary.json").read_text())["manifest"]["train_examples"] == 6

    # Re-running the finished job skips every stage (seconds, no Ray Train, no Serve) ...
    import time

    t = time.perf_counter()
    again = run_all(cfg)
    assert again["skipped"] == ["prepare", "train", "eval"] and time.perf_counter() - t < 20
    assert again["eval"] == summary["eval"] and again["exported_step"] == summary["exported_step"]
    # ... and changing an eval setting reruns only the eval stage (same adapter, same data).
    fewer = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"max_samples": 2})})
    third = run_all(fewer)
    assert third["skipped"] == ["prepare", "train"]
    assert {t["n"] for t in third["eval"]} == {2}
    assert json.loads((run / "stages.json").read_text())["train"]["outputs"]["exported_step"] == summary["exported_step"]
