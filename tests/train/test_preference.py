"""DPO and ORPO: the losses against hand computations, the completion log-probs against a
token-by-token loop, the pair batch, and on the tiny model: the reference is the adapter-disabled
base (the same weights, no second copy), and a few DPO steps on pairs read from JSONL widen the
chosen-vs-rejected margin."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ray_ft.config import TrainConfig
from ray_ft.data.preference import read_preference_source, tokenize_pair
from ray_ft.data.tokenize import IGNORE_INDEX
from ray_ft.train.methods import build_model
from ray_ft.train.preference import (
    completion_logps, dpo_loss, orpo_loss, pair_batch, preference_loss, reference_logps, sequence_logps)


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_dpo_loss_matches_the_formula_by_hand():
    pc, pr, rc, rr = [-4.0, -9.0], [-7.5, -8.0], [-5.0, -8.5], [-6.0, -9.5]
    beta, eps = 0.1, 0.2
    out = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta, label_smoothing=eps)
    want, chosen, rejected = 0.0, [], []
    for i in range(2):
        c, r = beta * (pc[i] - rc[i]), beta * (pr[i] - rr[i])  # pair 0: 0.1, -0.15; pair 1: -0.05, 0.15
        chosen.append(c)
        rejected.append(r)
        want += (-(1 - eps) * math.log(_sig(c - r)) - eps * math.log(_sig(r - c))) / 2
    assert out.loss.item() == pytest.approx(want, rel=1e-6)
    assert out.chosen_rewards.tolist() == pytest.approx(chosen) and out.rejected_rewards.tolist() == pytest.approx(rejected)
    assert out.accuracy == 0.5 and out.margin == pytest.approx(((0.1 + 0.15) + (-0.05 - 0.15)) / 2)
    # no smoothing: -log sigmoid of the reward difference
    plain = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta)
    assert plain.loss.item() == pytest.approx(-(math.log(_sig(0.25)) + math.log(_sig(-0.2))) / 2, rel=1e-6)


def test_orpo_loss_matches_the_formula_by_hand():
    cl, ct, rl, rt, lam = [-2.0, -6.0], [4, 3], [-9.0, -3.0], [3, 6], 0.25
    out = orpo_loss(torch.tensor(cl), torch.tensor(ct), torch.tensor(rl), torch.tensor(rt), lam)
    want = 0.0
    for i in range(2):
        pc, pr = math.exp(cl[i] / ct[i]), math.exp(rl[i] / rt[i])
        odds = math.log(pc / (1 - pc)) - math.log(pr / (1 - pr))
        want += (-cl[i] / ct[i] - lam * math.log(_sig(odds))) / 2
    assert out.loss.item() == pytest.approx(want, rel=1e-5)
    assert out.accuracy == 0.5  # pair 0: chosen more likely per token; pair 1: rejected


def test_completion_logps_sum_only_the_labelled_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 1, IGNORE_INDEX],
                           [IGNORE_INDEX, 6, 6, 0, 2]])
    got, n = completion_logps(logits, labels)
    for row in range(2):
        want = sum(torch.log_softmax(logits[row, t - 1], -1)[labels[row, t]].item()
                   for t in range(1, 5) if labels[row, t] != IGNORE_INDEX)
        assert got[row].item() == pytest.approx(want, rel=1e-5)
    assert n.tolist() == [2, 4]


def _pairs(tok, tmp_path, n: int = 4) -> dict:
    """A preference batch of n pairs through the real chain: JSONL -> reader -> chat template ->
    collate (chosen rows first, prompts masked)."""
    records = [{"prompt": f"Question {i}: which port does the Marren sail from?", "chosen": "Kelby harbour.",
                "rejected": "The moon, on Tuesdays."} for i in range(n)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    pairs, _ = read_preference_source(str(path))
    return pair_batch([tokenize_pair(tok, p, "You are a ferry clerk.") for p in pairs], tok.pad_token_id)


def test_pair_batch_puts_chosen_rows_first_and_masks_the_prompt(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = _pairs(tok, tmp_path, 2)
    assert batch["input_ids"].shape[0] == 4
    trained = [tok.decode(row[row != IGNORE_INDEX]) for row in batch["labels"]]
    assert trained == ["Kelby harbour.<|im_end|>\n"] * 2 + ["The moon, on Tuesdays.<|im_end|>\n"] * 2
    assert batch["attention_mask"].sum(1).tolist()[0] < batch["attention_mask"].sum(1).tolist()[2]  # rejected is longer


def test_dpo_on_the_tiny_model_uses_the_adapter_disabled_base_and_widens_the_margin(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = _pairs(tok, tmp_path)
    tcfg = TrainConfig(finetuning_type="lora", lora_rank=8, seed=0)
    model, num_params = build_model(str(tiny_model_dir), tcfg, torch.float32)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        want_ref = sequence_logps(base, batch)[0]
    # the reference is the base model's own log-probs, computed by the LoRA model itself: its
    # weights are the base's plus the adapter, nothing copied
    assert torch.allclose(reference_logps(model, batch), want_ref, atol=1e-5)
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n) == num_params

    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    margins = []
    for _ in range(6):
        out = preference_loss(model, batch, "dpo", beta=0.1, label_smoothing=0.0, orpo_lambda=0.1)
        margins.append(out.margin)
        out.loss.backward()
        optim.step()
        optim.zero_grad()
    assert margins[0] == pytest.approx(0.0, abs=1e-6)  # policy == reference before the first step
    assert all(b > a for a, b in zip(margins, margins[1:])), margins
    assert preference_loss(model, batch, "dpo", 0.1, 0.0, 0.1).accuracy == 1.0
    # the reference did not move while the adapter trained
    assert torch.allclose(reference_logps(model, batch), want_ref, atol=1e-5)


def test_dpo_needs_an_adapter_for_its_reference(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    batch = _pairs(AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path, 1)
    with pytest.raises(ValueError, match="finetuning_type must be lora"):
        reference_logps(model, batch)
    # ORPO needs no reference: it trains any model
    assert preference_loss(model, batch, "orpo", 0.1, 0.0, 0.1).loss.item() > 0


def test_logits_at_completion_positions_only_give_the_same_log_probs(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    batch = _pairs(AutoTokenizer.from_pretrained(tiny_model_dir), tmp_path, 3)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    with torch.no_grad():
        full, n_full = sequence_logps(model, batch, trained_only=False)
        kept, n_kept = sequence_logps(model, batch, trained_only=True)
    assert torch.allclose(full, kept, atol=1e-4) and n_full.tolist() == n_kept.tolist()
    assert n_full.tolist() == [7, 7, 7, 10, 10, 10]  # "Kelby harbour." / "The moon, on Tuesdays." + "<|im_end|>\n"


def test_a_padding_free_batch_gives_the_padded_batch_log_probs_and_loss(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_ft.data.preference import read_preference_source
    from ray_ft.train.attention import register_packed_sdpa

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    records = [{"prompt": f"Question {i}: which port does the Marren sail from?", "chosen": "Kelby harbour.",
                "rejected": "The moon, on Tuesdays" + " and Fridays" * i + "."} for i in range(3)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    rows = [tokenize_pair(tok, p, "You are a ferry clerk.") for p in read_preference_source(str(path))[0]]
    padded, flat = pair_batch(rows, tok.pad_token_id), pair_batch(rows, tok.pad_token_id, flatten=True)
    lengths = padded["attention_mask"].sum(1).tolist()
    # one row, every token real: the padded batch's real tokens end to end, no attention mask
    assert flat["input_ids"].shape == (1, sum(lengths)) and "attention_mask" not in flat
    assert padded["attention_mask"].numel() > sum(lengths)  # the padded batch did pad
    starts = (flat["position_ids"][0] == 0).nonzero().squeeze(1).tolist()
    assert starts == [sum(lengths[:i]) for i in range(6)]
    assert flat["segments"].bincount().tolist() == lengths
    assert torch.equal(flat["labels"][0][flat["labels"][0] != IGNORE_INDEX], padded["labels"][padded["labels"] != IGNORE_INDEX])

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=register_packed_sdpa())
    with torch.no_grad():
        want, want_n = sequence_logps(model, padded, trained_only=False)
        for trained_only in (False, True):
            got, n = sequence_logps(model, flat, trained_only=trained_only)
            assert torch.allclose(got, want, atol=1e-4), (trained_only, got, want)
            assert n.tolist() == want_n.tolist()
    lora, _ = build_model(str(tiny_model_dir), TrainConfig(finetuning_type="lora", lora_rank=8, seed=0),
                          torch.float32, packed=True)
    with torch.no_grad():  # a trained-looking adapter: policy != reference, so rewards are not 0
        for name, w in lora.named_parameters():
            if "lora_B" in name:
                w.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    a = preference_loss(lora, padded, "dpo", 0.1, 0.0, 0.1)
    b = preference_loss(lora, flat, "dpo", 0.1, 0.0, 0.1)
    assert b.loss.item() == pytest.approx(a.loss.item(), abs=1e-5)
    assert a.chosen_rewards.abs().min() > 1e-3
    assert torch.allclose(b.chosen_rewards, a.chosen_rewards, atol=1e-5)
    assert torch.allclose(b.rejected_rewards, a.rejected_rewards, atol=1e-5)
    o_a, o_b = (preference_loss(lora, x, "orpo", 0.1, 0.0, 0.1) for x in (padded, flat))
    assert o_b.loss.item() == pytest.approx(o_a.loss.item(), abs=1e-5)
