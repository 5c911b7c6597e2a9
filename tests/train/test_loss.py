"""The answer-only SFT loss (logits only where a label is trained) and bf16 compute for LoRA."""

import numpy as np
import pytest
import torch

from ray_ft.config import TrainConfig
from ray_ft.train.batches import answer_tokens, model_inputs, pad_collate
from ray_ft.train.loss import answer_only_loss, model_loss, supports_logits_to_keep, trained_positions


def _rows(specs, packed=False):
    """(prompt length, answer length) per example; padded rows, or one packed row of them all."""
    ids = [np.arange(10, 10 + p + a) for p, a in specs]
    labels = [np.concatenate([np.full(p, -100), np.arange(10 + p, 10 + p + a)]) for p, a in specs]
    if packed:
        batch = {"input_ids": [np.concatenate(ids)], "labels": [np.concatenate(labels)],
                 "position_ids": [np.concatenate([np.arange(len(x)) for x in ids])]}
        return pad_collate(batch, pad_id=0)
    return pad_collate({"input_ids": ids, "labels": labels}, pad_id=0)


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("packed", [False, True])
def test_answer_only_loss_equals_the_models_own_loss_and_gradients(tiny_model_dir, packed):
    from transformers import AutoModelForCausalLM

    from ray_ft.train.attention import register_packed_sdpa

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64,
                                                 attn_implementation=register_packed_sdpa() if packed else None)
    batch = _rows([(6, 2), (4, 12), (9, 3)], packed=packed)
    inputs = model_inputs(batch, "cpu")
    n = torch.tensor(float(answer_tokens(batch) + 5))  # the step's count covers other micro-batches too
    for extra in ({}, {"num_items_in_batch": n}):
        theirs = model_loss(model, inputs | extra)
        ours = answer_only_loss(model, inputs | extra)
        # transformers computes the cross-entropy in fp32 (logits.float()) even for a float64 model.
        assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
        assert torch.allclose(_grads(model, ours), _grads(model, theirs), rtol=1e-5, atol=1e-8)
    # Only positions whose next token is trained get logits: 2 + 12 + 3 answer tokens in all.
    kept = trained_positions(inputs["labels"])
    assert len(kept) == (17 if packed else 12) and len(kept) < inputs["input_ids"].shape[1]


def test_only_models_that_take_logits_to_keep_use_it(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ray_ft.train.steppers import training_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert supports_logits_to_keep(peft_model) and training_loss(peft_model) is answer_only_loss

    class Plain(torch.nn.Module):
        def forward(self, input_ids, labels=None):
            raise AssertionError("not called")

    assert not supports_logits_to_keep(Plain()) and training_loss(Plain()) is model_loss


def test_bf16_lora_computes_in_bf16_and_trains_fp32_adapters_without_fp32_activation_copies(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ray_ft.train.steppers import compute_context

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32  # peft keeps adapters fp32
    seen = []
    hook = layer.lora_A["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    x = torch.randn(1, 3, 64, dtype=torch.bfloat16)
    with compute_context(TrainConfig(precision="bf16"), model):
        out = layer(x)
    assert seen == [torch.bfloat16] and out.dtype == torch.bfloat16  # the adapter saw bf16 input
    hook.remove()
    layer.lora_B["default"].weight.data.normal_()
    with compute_context(TrainConfig(precision="bf16"), model):
        layer(x).float().sum().backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32  # fp32 master weights
    # fp32 on request: peft casts the input up to the adapter's dtype, as it did before.
    seen.clear()
    layer.lora_A["default"].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with compute_context(TrainConfig(precision="fp32"), model):
        layer(x)
    assert seen == [torch.float32]


def test_precision_auto_is_bf16_on_gpus_and_on_cpus_with_native_bf16(monkeypatch):
    from ray_ft.train import steppers

    monkeypatch.setattr("ray_ft.devices.cpu_has_native_bf16", lambda: True)
    assert steppers.resolved_precision(TrainConfig()) == "bf16"
    monkeypatch.setattr("ray_ft.devices.cpu_has_native_bf16", lambda: False)
    assert steppers.resolved_precision(TrainConfig()) == "fp32"
    assert steppers.resolved_precision(TrainConfig(use_gpu=True)) == "bf16"
    assert steppers.resolved_precision(TrainConfig(precision="fp32", use_gpu=True)) == "fp32"
