"""SFT on Ray Train (CPU, tiny 2-layer Llama): every method, DDP, DeepSpeed ZeRO-2/3, packing,
validation with best-checkpoint export, merged export, and resume after a killed worker."""


import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from ray_ft.config import TrainConfig, parse_job
from ray_ft.train.sft import run_training, steps_per_epoch, total_steps
from ray_ft.train.steppers import deepspeed_config
from tests.train.faults import fail_once, no_faults
from tests.train.sft_data import write_prepared


def test_step_arithmetic_leaves_out_partial_accumulation_groups():
    t = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, num_train_epochs=1.5)
    assert steps_per_epoch(9, t) == 2  # 5 micro-batches -> 2 full groups of 2
    assert total_steps(9, t) == 3
    assert total_steps(9, TrainConfig(max_steps=7)) == 7
    from ray_ft.errors import RayFTError

    with pytest.raises(RayFTError, match="train.gradient_accumulation_steps: 3 rows per worker make 3 micro-batches"):
        steps_per_epoch(3, TrainConfig(gradient_accumulation_steps=4))


def test_deepspeed_config_comes_from_the_job_and_takes_overrides():
    t = TrainConfig(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=0.5,
                    precision="bf16", deepspeed={"stage": 3, "offload_optimizer": True,
                                                 "overrides": {"zero_optimization": {"overlap_comm": True}}})
    ds = deepspeed_config(t, world_size=8)
    assert ds["train_batch_size"] == 64 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2 and ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True}
    zero = ds["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == "cpu"
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True  # merged, not replaced
    with pytest.raises(ValueError, match="may not set \\['train_batch_size'\\]"):
        TrainConfig(deepspeed={"stage": 2, "overrides": {"train_batch_size": 3}})


def _job(tmp_path, model_dir, **train):
    # fp32 unless a test asks: `auto` would follow this CPU (bf16 where it has AVX512-BF16), and the
    # seeded trajectories some tests rely on were measured in fp32.
    return parse_job({"name": "t", "output_dir": str(tmp_path / "runs"), "model": {"name": str(model_dir)},
                      "train": {"cpus_per_worker": 1, "lr_scheduler_type": "constant", "tensorboard": False,
                                "precision": "fp32", **train}})


def _losses(history, n=2):
    return np.mean([h["loss"] for h in history[:n]]), np.mean([h["loss"] for h in history[-n:]])


def _keys(path):
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


@pytest.mark.slow
# LoRA in fp32 trains in the DDP, ZeRO and resume tests below (same assertions on its losses and
# adapter keys), so here LoRA runs in bf16 only.
@pytest.mark.parametrize("method,lr,precision", [("lora", 3e-2, "bf16"), ("freeze", 3e-3, "fp32"),
                                                 ("full", 1e-3, "fp32")])
def test_each_method_reduces_the_training_loss(ray_cluster, tiny_model_dir, tmp_path, method, lr, precision):
    prepared = write_prepared(tmp_path / "data", tiny_model_dir, repeats=3)  # 12 examples
    cfg = _job(tmp_path, tiny_model_dir, finetuning_type=method, learning_rate=lr, num_train_epochs=4,
               per_device_train_batch_size=2, num_workers=1, cpus_per_worker=2, precision=precision)
    result = run_training(cfg, prepared, tiny_model_dir, tmp_path / "train")

    assert [h["step"] for h in result.history] == list(range(1, 25))
    # Every example is counted once per epoch: 12 examples, 4 epochs, 2 per step.
    assert [h["examples_seen"] for h in result.history] == [2 * s for s in range(1, 25)]
    first, last = _losses(result.history)
    assert last < 0.7 * first, (method, first, last)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    if method == "lora":
        assert result.adapter_dir.name == "adapter"
        assert all("lora_A" in k or "lora_B" in k for k in _keys(result.adapter_dir / "adapter_model.safetensors"))
        return
    trained = load_file(str(result.adapter_dir / "model.safetensors"))  # a whole model folder
    assert set(trained) == set(base)
    changed = {k for k in base if not np.array_equal(base[k].numpy(), trained[k].numpy())}
    if method == "freeze":  # default: the top 2 layers of 2 train, embeddings and final norm do not
        assert changed and all(".layers." in k for k in changed)
        assert "model.embed_tokens.weight" not in changed
    else:
        assert "model.embed_tokens.weight" in changed and "model.norm.weight" in changed
    assert not any("lora" in k for k in trained)


@pytest.mark.slow
def test_ddp_packed_validation_picks_the_best_checkpoint_and_merged_export_matches(
        ray_cluster, tiny_model_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    # Dev answers belong to other facts: training on the right answers first lowers the dev loss
    # (format, end of turn), then raises it, so the best checkpoint lies before the last one (at
    # this seed and learning rate: step 10 of 18, 0.75 below the last; a seeded CPU run repeats).
    prepared = write_prepared(tmp_path / "data", tiny_model_dir, repeats=6, packing_capacity=256,
                              val="wrong_answers")
    cfg = _job(tmp_path, tiny_model_dir, num_workers=2, learning_rate=6e-2, num_train_epochs=6,
               eval_every_n_steps=2, val_generate_samples=4, val_max_new_tokens=4, keep_checkpoints=2,
               export_merged=True, tensorboard=True)
    result = run_training(cfg, prepared, tiny_model_dir, tmp_path / "train")

    h = result.history
    rows = prepared.manifest()["train_rows"]
    assert [x["step"] for x in h] == list(range(1, len(h) + 1)) and len(h) == 6 * (rows // 2)
    assert all(x["padding_ratio"] == 0 for x in h)  # batch 1 of packed rows: nothing to pad
    val = {x["step"]: x["val_loss"] for x in h if "val_loss" in x}
    assert sorted(val) == [s for s in range(2, len(h) + 1, 2)]
    assert result.exported_step == min(val, key=val.get)
    assert result.exported_step < h[-1]["step"], val  # the selection mattered
    assert all(0 <= x["val_exact_match"] <= 1 and 0 <= x["val_origin"] <= 1 for x in h if "val_loss" in x)
    assert all(x["val_questions"] == 4 and x["val_f1_se"] >= 0 and x["val_s"] > 0 for x in h if "val_loss" in x)
    # Packed rows: examples counted per row (each packs several), both ranks summed; an epoch
    # sees every example but those of a row left over by the equal split across the two ranks.
    seen, examples = [x["examples_seen"] for x in h], prepared.manifest()["train_examples"]
    assert seen == sorted(set(seen)) and 0.8 * 6 * examples <= seen[-1] <= 6 * examples
    assert seen[-1] > 6 * prepared.manifest()["train_rows"]  # more than one example per row
    assert (tmp_path / "train" / "learning_curve.png").stat().st_size > 1000
    assert _losses(h)[1] < _losses(h)[0]

    keys = _keys(result.adapter_dir / "adapter_model.safetensors")
    assert len(keys) == 2 * 7 * 2 and all("lora_A" in k or "lora_B" in k for k in keys)
    assert (tmp_path / "train" / "loss.png").stat().st_size > 1000
    assert list((tmp_path / "train" / "tensorboard").glob("events.out.tfevents.*"))

    # The merged model generates exactly what base + adapter generates (greedy), unlike the base.
    prompt = torch.tensor([prepared_prompt(prepared)])
    merged = AutoModelForCausalLM.from_pretrained(result.merged_dir).eval()
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(result.adapter_dir)).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    gen = {name: m.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
           for name, m in (("merged", merged), ("peft", peft), ("base", base))}
    assert gen["merged"] == gen["peft"] and gen["merged"] != gen["base"]
    assert not any("lora" in k for k in _keys(result.merged_dir / "model.safetensors"))


def prepared_prompt(prepared):
    import pyarrow.parquet as pq

    from ray_ft.train.validation import prompt_part

    row = pq.read_table(prepared.val_file).to_pylist()[0]
    return prompt_part(row["input_ids"], row["labels"])


@pytest.mark.slow
@pytest.mark.parametrize("stage,method", [(2, "lora"), (3, "lora"), (3, "full")])
def test_deepspeed_zero_on_cpu_two_workers(ray_cluster, tiny_model_dir, tmp_path, stage, method):
    prepared = write_prepared(tmp_path / "data", tiny_model_dir, repeats=4, val="right_answers")  # 8 per worker
    cfg = _job(tmp_path, tiny_model_dir, num_workers=2, finetuning_type=method,
               learning_rate=3e-2 if method == "lora" else 2e-3, num_train_epochs=4,
               per_device_train_batch_size=2, gradient_accumulation_steps=2, eval_every_n_steps=4,
               val_generate_samples=2, val_max_new_tokens=3, deepspeed={"stage": stage})
    result = run_training(cfg, prepared, tiny_model_dir, tmp_path / "train")

    assert [x["step"] for x in result.history] == list(range(1, 9))  # 4 micro / 2 accumulation x 4 epochs
    first, last = _losses(result.history)
    assert last < 0.8 * first, (first, last)
    assert all(x["grad_norm"] is not None and x["grad_norm"] > 0 for x in result.history)
    assert {x["step"] for x in result.history if "val_loss" in x} == {4, 8}
    base = _keys(tiny_model_dir / "model.safetensors")
    if method == "lora":  # gathered from the ZeRO-3 shards: full-size A (r x in) and B (out x r)
        keys = _keys(result.adapter_dir / "adapter_model.safetensors")
        a = next(k for k in keys if "layers.0.self_attn.q_proj.lora_A" in k)
        assert keys[a] == (8, 64) and len(keys) == 2 * 7 * 2
    else:
        assert _keys(result.adapter_dir / "model.safetensors") == base
    # Each rank's ZeRO shard went into the same checkpoint folder.
    ckpts = sorted(p for p in (tmp_path / "train" / "ray").glob("sft_*/checkpoint_*") if p.is_dir())
    shards = {p.name for p in ckpts[-1].glob("deepspeed/state/*optim_states.pt")}
    assert shards == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}


RESUME_RUN = dict(num_workers=2, learning_rate=3e-2, max_steps=6, per_device_train_batch_size=2,
                  eval_every_n_steps=2, lr_scheduler_type="cosine")


@pytest.fixture(scope="module")
def clean_resume_run(ray_cluster, tiny_model_dir, tmp_path_factory):
    """The undisturbed run both resume tests compare with (their data and config are the same)."""
    tmp = tmp_path_factory.mktemp("clean")
    prepared = write_prepared(tmp / "data", tiny_model_dir, repeats=4)
    return run_training(_job(tmp, tiny_model_dir, **RESUME_RUN), prepared, tiny_model_dir, tmp / "clean")


@pytest.mark.slow
def test_killed_worker_resumes_from_the_last_checkpoint(clean_resume_run, tiny_model_dir, tmp_path, monkeypatch):
    """Rank 1 is SIGKILLed after step 3; Ray Train restarts both workers from the step-2
    checkpoint (weights, optimizer, scheduler, data position) and the run ends where an
    undisturbed run ends."""
    prepared = write_prepared(tmp_path / "data", tiny_model_dir, repeats=4)  # 16 rows, 8 per worker
    cfg = _job(tmp_path, tiny_model_dir, **RESUME_RUN)
    clean = clean_resume_run
    fail_once(monkeypatch, tmp_path / "killed" / ".killed_once", after_step=3, rank=1)
    killed = run_training(cfg, prepared, tiny_model_dir, tmp_path / "killed")

    assert "killed rank 1 after step 3" in (tmp_path / "killed" / ".killed_once").read_text()
    resumed = [h for h in killed.history if "resumed_from_step" in h]
    assert [(h["step"], h["resumed_from_step"]) for h in resumed] == [(3, 2)]
    assert [h["step"] for h in killed.history] == list(range(1, 7))
    assert [h["loss"] for h in killed.history] == pytest.approx([h["loss"] for h in clean.history], rel=1e-4)
    a = load_file(str(clean.adapter_dir / "adapter_model.safetensors"))
    b = load_file(str(killed.adapter_dir / "adapter_model.safetensors"))
    assert all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)


def _stopped_after_step_5(tiny_model_dir, tmp_path, monkeypatch, name: str):
    """A run with no restarts left whose rank 1 is killed after step 5 (checkpoints at 2 and 4):
    (its config, its data, its output folder)."""
    prepared = write_prepared(tmp_path / "data", tiny_model_dir, repeats=4)
    cfg = _job(tmp_path, tiny_model_dir, **RESUME_RUN, max_failures=0)
    out = tmp_path / name
    fail_once(monkeypatch, out / ".killed_once", after_step=5, rank=1)
    with pytest.raises(Exception):
        run_training(cfg, prepared, tiny_model_dir, out)
    no_faults(monkeypatch)
    return cfg, prepared, out


@pytest.mark.slow
def test_a_stopped_run_started_again_continues_from_its_last_checkpoint(clean_resume_run, tiny_model_dir, tmp_path,
                                                                        monkeypatch):
    """No restarts left (max_failures 0): the kill after step 5 ends the run with an error, as a
    Ctrl-C or a dead driver would. Started again with the same config and data (what `ray-ft run`
    does next), it continues from the step-4 checkpoint; started once more after it finished, it
    retrains nothing; resume=False (`--force train`) starts from step 0."""
    cfg, prepared, out = _stopped_after_step_5(tiny_model_dir, tmp_path, monkeypatch, "stopped")
    assert "killed rank 1 after step 5" in (out / ".killed_once").read_text()
    assert not (out / "adapter").exists()

    again = run_training(cfg, prepared, tiny_model_dir, out)
    assert [(h["step"], h["resumed_from_step"]) for h in again.history if "resumed_from_step" in h] == [(5, 4)]
    assert [h["step"] for h in again.history] == list(range(1, 7))
    clean = clean_resume_run
    assert [h["loss"] for h in again.history] == pytest.approx([h["loss"] for h in clean.history], rel=1e-4)

    finished = load_file(str(again.adapter_dir / "adapter_model.safetensors"))
    # A finished run deletes its stage's superseded runs (earlier configs), not other jobs' runs.
    (run,) = (out / "ray").glob(f"sft_{cfg.name}_*")
    superseded, other_job = out / "ray" / f"sft_{cfg.name}_0123456789ab", out / "ray" / f"sft_{cfg.name}_b_0123456789ab"
    for folder in (superseded, other_job):
        (folder / "checkpoint_0").mkdir(parents=True)
    once_more = run_training(cfg, prepared, tiny_model_dir, out)
    assert not superseded.exists() and other_job.exists() and run.is_dir()
    assert once_more.history == again.history  # no step was trained again
    assert all(np.array_equal(finished[k].numpy(), v.numpy())
               for k, v in load_file(str(once_more.adapter_dir / "adapter_model.safetensors")).items())
    fresh = run_training(cfg, prepared, tiny_model_dir, out, resume=False)
    assert [h["step"] for h in fresh.history] == list(range(1, 7))
    assert not any("resumed_from_step" in h for h in fresh.history)


@pytest.mark.slow
def test_a_damaged_latest_checkpoint_is_passed_over_for_the_one_before(clean_resume_run, tiny_model_dir, tmp_path,
                                                                       monkeypatch):
    """The run stops after step 5 (checkpoints at steps 2 and 4); the step-4 checkpoint's weights
    are then cut short, as a full disk would leave them. Started again, the run finds the damage
    through the recorded hashes, resumes from step 2 with a warning, and ends as an undisturbed run."""
    cfg, prepared, out = _stopped_after_step_5(tiny_model_dir, tmp_path, monkeypatch, "damaged")
    latest = sorted(p for p in (out / "ray").glob("sft_*/checkpoint_*") if p.is_dir())[-1]
    assert json.loads((latest / "loop_state.json").read_text())["step"] == 4
    weights = max(latest.rglob("*.safetensors"), key=lambda p: p.stat().st_size)
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    again = run_training(cfg, prepared, tiny_model_dir, out)
    assert [(h["step"], h["resumed_from_step"]) for h in again.history if "resumed_from_step" in h] == [(3, 2)]
    assert [h["step"] for h in again.history] == list(range(1, 7))
    clean = clean_resume_run
    assert [h["loss"] for h in again.history] == pytest.approx([h["loss"] for h in clean.history], rel=1e-4)
    assert not list(again.adapter_dir.glob("ray_ft_files*"))  # the export carries no checkpoint bookkeeping


def test_bf16_without_deepspeed_keeps_full_and_freeze_weights_fp32_under_autocast(monkeypatch):
    import torch

    from ray_ft.train.steppers import compute_context, weights_dtype

    lora = TrainConfig(precision="bf16", finetuning_type="lora")
    full = TrainConfig(precision="bf16", finetuning_type="full")
    freeze = TrainConfig(precision="bf16", finetuning_type="freeze")
    zero2 = TrainConfig(precision="bf16", finetuning_type="full", deepspeed={"stage": 2})
    assert weights_dtype(lora) == torch.bfloat16  # frozen base; peft keeps the adapters fp32
    assert weights_dtype(full) == weights_dtype(freeze) == weights_dtype(zero2) == torch.float32
    assert weights_dtype(TrainConfig(finetuning_type="full")) == torch.float32
    lin = torch.nn.Linear(4, 4)
    # Every matmul in bf16 under bf16 (lora too: its fp32 adapters under autocast); DeepSpeed owns its own.
    for cfg, want in ((full, torch.bfloat16), (freeze, torch.bfloat16), (lora, torch.bfloat16), (zero2, torch.float32)):
        with compute_context(cfg):
            assert lin(torch.ones(1, 4)).dtype == want, cfg.finetuning_type
    # Why: a small update survives in an fp32 weight and is rounded away in a bf16 one.
    assert torch.ones(1) - 1e-4 != 1 and torch.ones(1, dtype=torch.bfloat16) - 1e-4 == 1


def test_accumulated_micro_batches_train_on_the_mean_over_all_their_answer_tokens(tiny_model_dir):
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from ray_ft.train.batches import answer_tokens, model_inputs, pad_collate

    def rows(specs):  # (prompt length, answer length) per example
        ids = [np.arange(10, 10 + p + a) for p, a in specs]
        labels = [np.concatenate([np.full(p, -100), np.arange(10 + p, 10 + p + a)]) for p, a in specs]
        return pad_collate({"input_ids": ids, "labels": labels}, pad_id=0)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    small, large = rows([(6, 2)]), rows([(4, 12)])  # 2 vs 12 answer tokens
    assert (answer_tokens(small), answer_tokens(large)) == (2, 12)

    def grads(losses):
        model.zero_grad()
        for loss in losses():
            loss.backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    whole = grads(lambda: [model(**model_inputs(rows([(6, 2), (4, 12)]), "cpu")).loss])
    n = torch.tensor(float(answer_tokens(small) + answer_tokens(large)))
    # What the training loop does: each micro-batch's token losses summed over the group's count.
    ours = grads(lambda: [model(**model_inputs(b, "cpu") | {"num_items_in_batch": n}).loss for b in (small, large)])
    mean_of_means = grads(lambda: [model(**model_inputs(b, "cpu")).loss / 2 for b in (small, large)])
    assert torch.allclose(ours, whole, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(mean_of_means, whole, rtol=1e-3)  # the old objective was another one
