"""The preference recipe on Ray Train (`train.method: dpo | orpo`): pairs file -> Ray Data
tokenization -> the shared step loop -> an exported adapter; resume after a killed worker comes
from the shared loop; on the real SmolLM2, DPO on financial QA pairs lifts the dev reward accuracy
above chance."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from safetensors.torch import load_file

from ray_ft.config import parse_job
from ray_ft.errors import RayFTError
from ray_ft.train.dpo import run_preference
from tests.conftest import FINQA
from tests.train.faults import fail_once


def _write_pairs(path, n: int) -> str:
    """n pairs over n distinct prompts: chosen is the right port, rejected a nonsense reply."""
    ports = ["Kelby", "Arrow", "Brenn", "Dunmore", "Hale", "Oster"]
    rows = [{"id": f"q{i}", "prompt": f"Ferry {i} sails from which port?",
             "chosen": f"{ports[i % len(ports)]} harbour.", "rejected": "The moon, on Tuesdays."} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _job(tmp_path, model_dir, pairs: str, **train):
    return parse_job({
        "name": "pref", "output_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)},
        "train": {"method": "dpo", "cpus_per_worker": 1, "lr_scheduler_type": "constant", "tensorboard": False,
                  "precision": "fp32", "preference": {"source": pairs, "dev_size": 0.25, "beta": 0.1}, **train}})


def test_the_config_names_a_registered_recipe_and_its_metrics():
    from ray_ft.recipes import LLM_RECIPES, RECIPES

    assert set(LLM_RECIPES) == {"sft", "dpo", "orpo"} and "embedding" in RECIPES
    assert RECIPES["dpo"].load() is run_preference
    with pytest.raises(RayFTError, match="method='ppo' is not a recipe; choose one of \\['dpo', 'orpo', 'sft'\\]"):
        parse_job({"name": "x", "train": {"method": "ppo"}})
    with pytest.raises(RayFTError, match="method=dpo needs preference.source"):
        parse_job({"name": "x", "train": {"method": "dpo"}})
    with pytest.raises(RayFTError, match="method=dpo needs finetuning_type=lora"):
        parse_job({"name": "x", "train": {"method": "dpo", "finetuning_type": "full", "preference": {"source": "p"}}})
    with pytest.raises(RayFTError, match="metric_for_best=val_f1 is an sft metric"):
        parse_job({"name": "x", "train": {"method": "orpo", "metric_for_best": "val_f1", "preference": {"source": "p"}}})
    with pytest.raises(RayFTError, match="metric_for_best=val_reward_accuracy is a preference metric"):
        parse_job({"name": "x", "train": {"metric_for_best": "val_reward_accuracy"}})


@pytest.mark.slow
def test_dpo_on_ray_train_widens_the_dev_margin_and_exports_an_adapter(ray_cluster, tiny_model_dir, tmp_path):
    pairs = _write_pairs(tmp_path / "pairs.jsonl", 16)
    cfg = _job(tmp_path, tiny_model_dir, pairs, num_workers=2, learning_rate=5e-3, max_steps=6,
               per_device_train_batch_size=2, eval_every_n_steps=3, metric_for_best="val_reward_margin")
    result = run_preference(cfg, None, tiny_model_dir, tmp_path / "train")

    manifest = json.loads((tmp_path / "train" / "pairs" / "manifest.json").read_text())
    assert manifest == {"source": pairs, "read_pairs": 16, "skipped_records": 0, "train_pairs": 12, "dev_pairs": 4,
                        "dropped_over_cutoff_len": 0}
    assert [h["step"] for h in result.history] == list(range(1, 7))
    assert result.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 1
    assert result.history[0]["examples_seen"] == 4  # 2 pairs on each of 2 workers
    val = [h for h in result.history if "val_reward_margin" in h]
    assert [h["step"] for h in val] == [3, 6] and all(h["val_pairs"] == 4 for h in val)
    assert val[1]["val_reward_margin"] > val[0]["val_reward_margin"] > 0
    assert val[1]["val_reward_accuracy"] == 1.0
    assert all(h["tokens_per_s"] > 0 and 0 <= h["padding_ratio"] < 1 for h in result.history)
    assert result.exported_step == 6  # the best margin
    assert (result.adapter_dir / "adapter_config.json").is_file()
    assert any("lora_" in k for k in load_file(str(result.adapter_dir / "adapter_model.safetensors")))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_dpo_under_deepspeed_zero_two_workers(ray_cluster, tiny_model_dir, tmp_path, stage):
    """The same recipe under ZeRO-2/3 (the reference is still the adapter-disabled policy, whose
    weights ZeRO-3 shards over the workers): the dev margin grows from zero, every rank's ZeRO
    shard is in the checkpoint, and the exported adapter has full-size matrices."""
    pairs = _write_pairs(tmp_path / "pairs.jsonl", 16)
    cfg = _job(tmp_path, tiny_model_dir, pairs, num_workers=2, learning_rate=5e-3, max_steps=6,
               per_device_train_batch_size=2, eval_every_n_steps=3, metric_for_best="val_reward_margin",
               deepspeed={"stage": stage})
    result = run_preference(cfg, None, tiny_model_dir, tmp_path / "train")

    assert [h["step"] for h in result.history] == list(range(1, 7))
    assert result.history[0]["reward_margin"] == pytest.approx(0.0, abs=1e-5)  # policy == reference at step 1
    val = [h for h in result.history if "val_reward_margin" in h]
    assert [h["step"] for h in val] == [3, 6] and val[1]["val_reward_margin"] > val[0]["val_reward_margin"] > 0
    ckpts = sorted(p for p in (tmp_path / "train" / "ray").glob("*/checkpoint_*") if p.is_dir())
    shards = {p.name for p in ckpts[-1].glob("deepspeed/state/*optim_states.pt")}
    assert shards == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    weights = load_file(str(result.adapter_dir / "adapter_model.safetensors"))
    a = next(k for k in weights if "layers.0.self_attn.q_proj.lora_A" in k)
    assert tuple(weights[a].shape) == (8, 64)  # gathered from the shards, not one rank's part


@pytest.mark.slow
def test_a_killed_preference_worker_resumes_with_the_same_losses(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    """Resume is the shared loop's: rank 1 dies after step 3, the group restarts from the step-2
    checkpoint, and the loss curve and adapter equal an undisturbed run's (ORPO here)."""
    pairs = _write_pairs(tmp_path / "pairs.jsonl", 16)
    cfg = _job(tmp_path, tiny_model_dir, pairs, method="orpo", num_workers=2, learning_rate=5e-3, max_steps=5,
               per_device_train_batch_size=2, eval_every_n_steps=2)
    clean = run_preference(cfg, None, tiny_model_dir, tmp_path / "clean")
    fail_once(monkeypatch, tmp_path / "killed" / ".killed_once", after_step=3, rank=1)
    killed = run_preference(cfg, None, tiny_model_dir, tmp_path / "killed")

    assert "killed rank 1 after step 3" in (tmp_path / "killed" / ".killed_once").read_text()
    assert [(h["step"], h["resumed_from_step"]) for h in killed.history if "resumed_from_step" in h] == [(3, 2)]
    assert [h["loss"] for h in killed.history] == pytest.approx([h["loss"] for h in clean.history], rel=1e-4)
    a = load_file(str(clean.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(killed.adapter_dir / "adapter_model.safetensors"))
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)


def _finqa_pairs(path, n: int) -> str:
    """Financial QA pairs: the question with its context; chosen = the reference answer, rejected
    = the answer to another question (fluent, on topic, but not what was asked)."""
    with FINQA.open(newline="", encoding="utf-8") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    out = []
    for i, r in enumerate(rows):
        other = rows[(i + n // 2) % n]
        out.append({"id": f"fin{i}", "prompt": f"Context: {r['context']}\n\nQuestion: {r['question']}",
                    "chosen": r["answer"], "rejected": other["answer"]})
    path.write_text("".join(json.dumps(o, ensure_ascii=False) + "\n" for o in out))
    return str(path)


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_dpo_on_smollm2_lifts_dev_reward_accuracy_above_chance(ray_cluster, smollm_dir, tmp_path):
    pairs = _finqa_pairs(tmp_path / "pairs.jsonl", 80)
    cfg = _job(tmp_path, smollm_dir, pairs, num_workers=1, cpus_per_worker=2, learning_rate=5e-4, max_steps=12,
               per_device_train_batch_size=4, eval_every_n_steps=6, lora_rank=8,
               preference={"source": pairs, "dev_size": 0.2, "beta": 0.1, "val_max_pairs": 16})
    result = run_preference(cfg, None, smollm_dir, tmp_path / "train")

    val = [h for h in result.history if "val_reward_accuracy" in h]
    assert [h["val_pairs"] for h in val] == [16, 16]
    # Rewards are 0 for both replies before training (policy == reference): accuracy starts at 0.
    assert val[-1]["val_reward_accuracy"] > 0.5, val
    assert val[-1]["val_reward_margin"] > 0
    assert result.history[-1]["tflops"] > 0
