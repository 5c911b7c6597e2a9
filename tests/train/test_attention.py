"""Per-example SDPA for packed rows: same loss, gradients and generations as transformers' sdpa."""

import json

import pytest
import torch

from ray_ft.train.attention import PACKED_SDPA, example_bounds, register_packed_sdpa


def _tiny(attn: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if attn == PACKED_SDPA:
        register_packed_sdpa()
    return LlamaForCausalLM(cfg).to(torch.float64).eval().requires_grad_(True), cfg


def _set_attn(model, attn):
    model.config._attn_implementation = attn
    return model


def _packed_batch():
    """Row 0: examples of 5, 7 and 3 tokens + a padding segment of 3; row 1: 9 + 9 tokens."""
    g = torch.Generator().manual_seed(1)
    lens = [[5, 7, 3, 3], [9, 9]]
    ids = torch.randint(3, 97, (2, 18), generator=g)
    pos = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in lens])
    labels = ids.clone()
    labels[0, 15:] = -100  # the padding segment is not trained on
    return ids, pos, labels, lens


def test_example_bounds_cut_rows_where_positions_restart():
    _, pos, _, _ = _packed_batch()
    assert example_bounds(pos, 2, 18) == [[0, 5, 12, 15, 18], [0, 9, 18]]
    assert example_bounds(torch.arange(6).unsqueeze(0), 3, 6) == [[0, 6]] * 3  # broadcast, no packing
    pos[1, 4] = 0  # kept on the tensor, but an in-place change is seen
    assert example_bounds(pos, 2, 18) == [[0, 5, 12, 15, 18], [0, 4, 5, 9, 18]]


def test_packed_rows_give_the_loss_and_gradients_of_the_block_diagonal_mask(monkeypatch):
    import ray_ft.train.attention as attention

    cuts, syncs = [], []
    monkeypatch.setattr(attention, "example_bounds", lambda *a: cuts.append(1) or example_bounds(*a))
    cut_rows = attention._cut_rows
    monkeypatch.setattr(attention, "_cut_rows", lambda *a: syncs.append(1) or cut_rows(*a))
    ids, pos, labels, lens = _packed_batch()
    model, _ = _tiny(PACKED_SDPA)
    results = {}
    for attn in ("sdpa", PACKED_SDPA):
        _set_attn(model, attn).zero_grad()
        out = model(input_ids=ids, position_ids=pos, labels=labels, use_cache=False)
        out.loss.backward()
        results[attn] = (out.loss.item(), out.logits.detach(),
                         {n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(cuts) == 2 and len(syncs) == 1  # each layer cuts the rows; computed once per forward
    (loss_a, logits_a, grads_a), (loss_b, logits_b, grads_b) = results["sdpa"], results[PACKED_SDPA]
    assert loss_b == pytest.approx(loss_a, abs=1e-12) and loss_a > 4.0  # ~ln(97) for a random model
    assert torch.allclose(logits_a, logits_b, atol=1e-10)
    assert all(torch.allclose(grads_a[n], grads_b[n], atol=1e-10) for n in grads_a)
    # And each example sees only itself: its logits equal running it alone.
    alone = model(input_ids=ids[1:, 9:], use_cache=False).logits
    assert torch.allclose(alone, logits_b[1:, 9:], atol=1e-10)
    assert not torch.allclose(model(input_ids=ids[1:], use_cache=False).logits[:, 9:], alone, atol=1e-3)


def test_padded_batches_and_cached_generation_take_the_plain_sdpa_path(monkeypatch):
    import ray_ft.train.attention as attention

    cuts = []
    monkeypatch.setattr(attention, "example_bounds", lambda *a: cuts.append(1) or example_bounds(*a))
    model, _ = _tiny(PACKED_SDPA)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 97, (2, 8), generator=g)
    mask = torch.tensor([[1] * 8, [1] * 5 + [0] * 3])
    left = torch.tensor([[1] * 8, [0] * 3 + [1] * 5])
    out = {}
    for attn in ("sdpa", PACKED_SDPA):
        _set_attn(model, attn)
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
            gen = model.generate(input_ids=ids, attention_mask=left, max_new_tokens=6, do_sample=False,
                                 pad_token_id=0)
        out[attn] = (padded, gen)
    assert not cuts  # a padding mask was given: transformers' sdpa with that mask
    assert torch.allclose(out["sdpa"][0], out[PACKED_SDPA][0], atol=1e-10)
    assert torch.equal(out["sdpa"][1], out[PACKED_SDPA][1]) and out["sdpa"][1].shape == (2, 14)


def test_a_saved_model_does_not_name_the_packed_attention(tmp_path):
    model, _ = _tiny(PACKED_SDPA)
    _set_attn(model, PACKED_SDPA).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert PACKED_SDPA not in json.dumps(saved)  # vLLM and plain transformers load the export


def test_the_trainer_loads_packed_attention_for_packed_rows_unless_told_otherwise(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from pydantic import ValidationError

    from ray_ft.config import TrainConfig
    from ray_ft.data.prepare import PreparedData
    from ray_ft.train.methods import attention_for

    assert attention_for(TrainConfig(), packed=True) == PACKED_SDPA
    assert attention_for(TrainConfig(), packed=False) is None  # transformers' own default (sdpa)
    assert attention_for(TrainConfig(attn_implementation="sdpa"), packed=True) == "sdpa"
    with pytest.raises(ValidationError, match="flash_attention_2 needs use_gpu"):
        TrainConfig(attn_implementation="flash_attention_2")
    # Packed or not is read from the prepared shards themselves.
    for name, cols in (("packed", {"input_ids": [[1]], "position_ids": [[0]]}), ("padded", {"input_ids": [[1]]})):
        (tmp_path / name / "train").mkdir(parents=True)
        pq.write_table(pa.table(cols), tmp_path / name / "train" / "part-00000.parquet")
    assert PreparedData(tmp_path / "packed").packed() and not PreparedData(tmp_path / "padded").packed()


def test_a_flattened_batch_of_packed_rows_trains_like_the_padded_batch():
    """Padding-free batches: rows end to end in one row give the padded batch's loss and gradients,
    with no padding token in the forward pass."""
    import numpy as np

    from ray_ft.train.batches import flattens, pad_collate

    g = torch.Generator().manual_seed(3)
    rows = [[6, 4], [9], [3, 5, 2]]  # example lengths of three packed rows (10, 9, 10 tokens)
    batch = {"input_ids": [], "labels": [], "position_ids": []}
    for lens in rows:
        ids = torch.randint(3, 97, (sum(lens),), generator=g).tolist()
        pos = [p for n in lens for p in range(n)]
        batch["input_ids"].append(ids)
        batch["labels"].append([-100 if p == 0 else t for t, p in zip(ids, pos)])  # as pack_table masks
        batch["position_ids"].append(pos)
    batch = {k: np.array(v, dtype=object) for k, v in batch.items()}
    padded, flat = pad_collate(batch, pad_id=0), pad_collate(batch, pad_id=0, flatten=True)
    assert padded["input_ids"].shape == (3, 10) and flat["input_ids"].shape == (1, 29)
    assert int(flat["num_real_tokens"]) == int(padded["num_real_tokens"]) == 29
    assert flat["position_ids"][0].tolist() == [p for r in batch["position_ids"] for p in r]
    assert "attention_mask" not in flat

    model, _ = _tiny(PACKED_SDPA)
    results = []
    for inputs in (padded, flat):
        model.zero_grad()
        out = model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"],
                    labels=inputs["labels"], use_cache=False)
        out.loss.backward()
        results.append((out.loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_p, grads_p), (loss_f, grads_f) = results
    assert loss_f == pytest.approx(loss_p, abs=1e-12) and loss_p > 4.0
    assert all(torch.allclose(grads_p[n], grads_f[n], atol=1e-10) for n in grads_p)
    # Only attentions that cut rows per example flatten; sdpa would mask the whole flattened row.
    assert flattens(PACKED_SDPA) and flattens("flash_attention_2")
    assert not flattens("sdpa") and not flattens("eager") and not flattens(None)
