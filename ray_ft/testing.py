"""Helpers shared by the tests and the benchmarks (like `torch.testing`): not used by jobs."""

from __future__ import annotations

from pathlib import Path


def make_random_lora_adapter(model_dir: Path | str, out: Path | str, std: float = 0.05, seed: int = 0):
    """Save a rank-8 all-linear LoRA adapter whose B matrices are N(0, std), seeded; return the
    peft model. std=0.05 changes SmolLM2's greedy answers without making them noise."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, std)
    peft_model.save_pretrained(out)
    return peft_model
