"""The three fine-tuning methods (LoRA, freeze, full): which weights train, and how each is saved.

- lora: a peft adapter on the chosen linear layers; checkpoints and export hold only the adapter.
- freeze: the last `freeze_trainable_layers` decoder layers train, everything else is frozen;
  checkpoints and export are whole Hugging Face model folders.
- full: every weight trains; saved as whole model folders.
"""

from __future__ import annotations

import re
from pathlib import Path

from ray_ft.config import TrainConfig
from ray_ft.errors import RayFTError


def lora_target_modules(spec: str) -> str | list[str]:
    return "all-linear" if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]


def decoder_layer_index(name: str) -> int | None:
    """`model.layers.11.mlp.up_proj.weight` -> 11 (None for embeddings, final norm, head)."""
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def freeze_all_but_top_layers(model, n_trainable: int) -> list[str]:
    """requires_grad only on the last `n_trainable` decoder layers; returns the trained names."""
    indices = {i for n, _ in model.named_parameters() if (i := decoder_layer_index(n)) is not None}
    if not indices:
        raise RayFTError(f"{type(model).__name__}: no `.layers.N.` parameters; freeze cannot pick layers")
    if n_trainable > len(indices):
        raise RayFTError(f"train.freeze_trainable_layers={n_trainable} > the model's {len(indices)} layers")
    first = max(indices) - n_trainable + 1
    trained = []
    for name, p in model.named_parameters():
        idx = decoder_layer_index(name)
        p.requires_grad_(idx is not None and idx >= first)
        if p.requires_grad:
            trained.append(name)
    return trained


def attention_for(tcfg: TrainConfig, packed: bool) -> str | None:
    """The transformers `attn_implementation` to load with (`train.attn_implementation`; None:
    transformers' own choice, sdpa where the model has it)."""
    from ray_ft.train.attention import register_packed_sdpa

    if tcfg.attn_implementation == "auto":
        return register_packed_sdpa() if packed else None
    return tcfg.attn_implementation


def build_model(model_dir: str, tcfg: TrainConfig, dtype, packed: bool = False):
    """(model ready for training, number of base parameters) for `tcfg.finetuning_type`; `packed`:
    the training rows are packed (see `attention_for`)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(tcfg.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=attention_for(tcfg, packed))
    num_params = sum(p.numel() for p in model.parameters())
    if tcfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if tcfg.finetuning_type == "lora":
        from peft import LoraConfig, get_peft_model

        if tcfg.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks need a grad-requiring input
        lcfg = LoraConfig(
            r=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
            target_modules=lora_target_modules(tcfg.lora_target), task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lcfg)
    elif tcfg.finetuning_type == "freeze":
        freeze_all_but_top_layers(model, tcfg.freeze_trainable_layers)
    return model, num_params


def save_export(model, tok, folder: Path, finetuning_type: str) -> None:
    """lora: adapter_model.safetensors + adapter_config.json only; else a whole model folder."""
    if finetuning_type == "lora":
        model.save_pretrained(folder)  # peft writes only the adapter weights and its config
    else:
        model.save_pretrained(folder, safe_serialization=True)
    tok.save_pretrained(folder)


def save_trained(stepper, tok, folder: Path, finetuning_type: str, rank: int) -> None:
    """A checkpoint's `export/` folder from a stepper: rank 0 writes, and under ZeRO-3 every rank
    takes part in gathering the sharded weights first."""
    trainable = [p for p in stepper.module.parameters() if p.requires_grad] \
        if finetuning_type == "lora" else list(stepper.module.parameters())
    with stepper.gathered(trainable):
        if rank == 0:
            save_export(stepper.module, tok, folder / "export", finetuning_type)


def load_trained_weights(model, folder: Path, finetuning_type: str) -> None:
    """Put the weights a checkpoint folder holds back into `model` (before any wrapping)."""
    from safetensors.torch import load_file

    if finetuning_type == "lora":
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(folder / "adapter_model.safetensors")))
        return
    state = {}
    for f in sorted(folder.glob("model*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise RayFTError(f"{folder}: checkpoint does not match the model "
                         f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})")


def merge_adapter(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """base + adapter -> one model folder (safetensors) with the LoRA deltas merged into the weights."""
    import shutil
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    merged.save_pretrained(tmp, safe_serialization=True)
    # The adapter's own tokenizer when it was saved with one (ray_ft's exports are), else the base's.
    has_tok = (Path(adapter_dir) / "tokenizer_config.json").is_file()
    AutoTokenizer.from_pretrained(adapter_dir if has_tok else base_dir).save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
