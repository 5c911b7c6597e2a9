"""The SFT loss with logits only where a label is trained.

A causal LM's forward computes the head (hidden -> vocabulary) and the cross-entropy's softmax for
every position, but SFT with a masked prompt trains only the answer tokens: ~10 positions of a
~500-token CMRC2018 example. The head of SmolLM2 (576 x 49,152) is a fifth of the model's
multiply-adds per token, and its fp32 logits are 2,048 x 49,152 x 4 bytes = 400 MB per packed
row. Here the model is asked, through transformers' `logits_to_keep` (a 1-D tensor of sequence
positions), for the logits of the positions whose next token is a label, and the loss is their
summed cross-entropy over `num_items_in_batch` — the same number transformers' ForCausalLMLoss
gives over the whole sequence (tests/train/test_loss.py), without the head or the softmax on the
prompt. Measured in bench/sft_step.py.
"""

from __future__ import annotations

import inspect

from ray_ft.data.tokenize import IGNORE_INDEX, trained_positions


def supports_logits_to_keep(model) -> bool:
    """The Hugging Face model's forward takes `logits_to_keep` (Llama, Qwen2, Mistral, Gemma, ...
    in transformers >= 4.50). Asked of the bare model (a peft model's base); peft, DDP and
    DeepSpeed wrappers pass the argument through."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(inner.forward).parameters


def model_loss(model, inputs: dict):
    """The model's own loss (logits at every position): models without `logits_to_keep`."""
    return model(**inputs).loss


def answer_only_loss(model, inputs: dict):
    """The causal-LM loss of `inputs` (input_ids, labels, num_items_in_batch, ...), computing the
    head only at `trained_positions`. `num_items_in_batch` (the answer tokens of the whole
    optimizer step) is the divisor, as in transformers' ForCausalLMLoss; without it, the number of
    trained tokens of this batch."""
    import torch.nn.functional as F

    inputs = dict(inputs)
    labels = inputs.pop("labels")
    num_items = inputs.pop("num_items_in_batch", None)
    positions = trained_positions(labels)
    targets = labels[:, positions + 1]  # [batch, kept]; rows where a kept position is not trained: -100
    logits = model(**inputs, logits_to_keep=positions).logits
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    if num_items is None:
        num_items = (targets != IGNORE_INDEX).sum()
    return total / num_items
