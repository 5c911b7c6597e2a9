import numpy as np
import pyarrow as pa
import pytest

from ray_ft.data.packing import first_fit_decreasing, pack_table, segment_ids
from ray_ft.data.shards import fill_ratio, length_histogram
from ray_ft.data.tokenize import IGNORE_INDEX
from ray_ft.train.batches import pad_collate


def test_first_fit_decreasing_fills_bins_within_capacity_in_input_order():
    lengths = [5, 3, 7, 2, 4, 1]
    bins = first_fit_decreasing(lengths, capacity=8)
    assert sorted(i for b in bins for i in b) == list(range(6))  # every example exactly once
    assert all(sum(lengths[i] for i in b) <= 8 for b in bins)
    assert bins == [[0, 1], [2, 5], [3, 4]]  # 7+1, 5+3, 4+2: 3 bins, ordered by first index
    with pytest.raises(ValueError, match="example 0 has 9 tokens"):
        first_fit_decreasing([9], capacity=8)


def _table(examples):
    return pa.table({"id": [str(i) for i in range(len(examples))],
                     "input_ids": [e[0] for e in examples], "labels": [e[1] for e in examples]})


def test_pack_table_restarts_positions_and_masks_each_examples_first_label():
    a = ([1, 2, 3], [IGNORE_INDEX, 2, 3])
    b = ([4, 5], [4, 5])  # a first label that is trained would learn "end of a -> start of b"
    c = ([6, 7, 8, 9], [IGNORE_INDEX, IGNORE_INDEX, 8, 9])
    packed = pack_table(_table([a, b, c]), capacity=6).to_pylist()
    # First-fit decreasing: c (4) opens row 1, a (3) does not fit beside it, b (2) does.
    assert [r["ids"] for r in packed] == [["0"], ["1", "2"]]
    row = packed[1]
    assert row["input_ids"] == [4, 5, 6, 7, 8, 9]
    assert row["position_ids"] == [0, 1, 0, 1, 2, 3]
    assert row["labels"] == [IGNORE_INDEX, 5, IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    assert row["num_tokens"] == 6 and row["num_examples"] == 2
    assert segment_ids(np.array(row["position_ids"])).tolist() == [0, 0, 1, 1, 1, 1]


def test_collate_of_packed_rows_makes_padding_its_own_segment():
    batch = {"input_ids": np.array([[1, 2, 3, 4, 5], [6, 7]], dtype=object),
             "labels": np.array([[-100, 2, 3, -100, 5], [-100, 7]], dtype=object),
             "position_ids": np.array([[0, 1, 2, 0, 1], [0, 1]], dtype=object)}
    out = pad_collate(batch, pad_id=0)
    assert "attention_mask" not in out  # the mask is built from the position ids
    assert out["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert out["labels"][1].tolist() == [-100, 7, -100, -100, -100]
    assert int(out["num_real_tokens"]) == 7


def test_pad_collate_pads_right_and_masks():
    batch = {"input_ids": np.array([[1, 2, 3], [4]], dtype=object),
             "labels": np.array([[IGNORE_INDEX, 2, 3], [4]], dtype=object)}
    out = pad_collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3], [4, 0, 0]]
    assert out["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [4, IGNORE_INDEX, IGNORE_INDEX]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert int(out["num_real_tokens"]) == 4 and "position_ids" not in out


@pytest.mark.parametrize("attn", ["sdpa", "packed"])
def test_packed_row_gives_each_example_the_logits_it_has_alone(tiny_model_dir, attn):
    """The claim packing rests on: attention does not cross examples in a packed row (with
    transformers' sdpa and with the per-example attention the trainer loads for packed data)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ray_ft.train.attention import register_packed_sdpa

    impl = register_packed_sdpa() if attn == "packed" else attn
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=impl).eval()
    torch.manual_seed(0)
    examples = [torch.randint(5, 1000, (n,)).tolist() for n in (7, 12, 5)]
    table = _table([(e, e) for e in examples])
    row = pack_table(table, capacity=40).to_pylist()[0]
    out = pad_collate({k: np.array([row[k]], dtype=object) for k in ("input_ids", "labels", "position_ids")}, 0)
    with torch.no_grad():
        packed = model(input_ids=out["input_ids"], position_ids=out["position_ids"], use_cache=False).logits[0]
        start = 0
        for e in examples:
            alone = model(input_ids=torch.tensor([e]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[start:start + len(e)], alone, atol=1e-4, rtol=1e-4)
            start += len(e)
        # Control: without the restarted positions the second example would see the first.
        crossed = model(input_ids=out["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(crossed[7:19], packed[7:19], atol=1e-3)


def test_length_histogram_and_fill_ratio():
    hist = length_histogram([1, 2, 3, 8, 9, 16], cutoff=16, bins=2)
    assert hist == {"1-8": 4, "9-16": 2}
    assert fill_ratio([4, 2, 2, 2], batch_size=2) == pytest.approx(10 / 12, abs=1e-4)
