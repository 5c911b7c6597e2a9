import pytest

from ray_ft.config import TrainConfig, parse_job
from ray_ft.errors import RayFTError
from ray_ft.served import trained_model
from ray_ft.train.validation import prompt_part, rank_slice


def test_rank_slices_are_equal_sized_and_cover_every_row_once():
    world, n = 3, 7
    slices = [rank_slice(n, r, world) for r in range(world)]
    assert {len(s) for s in slices} == {3}  # equal: ZeRO-3 ranks run the same number of forwards
    counted = sorted(i for s in slices for i, w in s if w == 1.0)
    assert counted == list(range(n))  # padding rows carry weight 0
    assert sum(1 for s in slices for _, w in s if w == 0.0) == 2


def test_prompt_part_stops_before_the_first_trained_token():
    assert prompt_part([5, 6, 7, 8], [-100, -100, 7, 8]) == [5, 6]
    assert prompt_part([5, 6], [-100, -100]) == [5, 6]


def test_training_combinations_are_checked_on_load():
    with pytest.raises(ValueError, match="early_stopping_patience needs eval_every_n_steps"):
        TrainConfig(early_stopping_patience=2)
    with pytest.raises(ValueError, match="metric_for_best=val_origin needs val_generate_samples > 0"):
        TrainConfig(metric_for_best="val_origin", val_generate_samples=0)
    with pytest.raises(ValueError, match="export_merged applies to lora only"):
        TrainConfig(finetuning_type="full", export_merged=True)
    with pytest.raises(RayFTError, match="field 'train.deepspeed.stage'"):
        parse_job({"name": "x", "train": {"deepspeed": {"stage": 1}}})


def test_a_whole_fine_tuned_model_is_served_from_its_model_folder(tmp_path):
    cfg = parse_job({"name": "x", "output_dir": str(tmp_path), "train": {"finetuning_type": "full"}})
    with pytest.raises(RayFTError, match=r"x/train/model: no fine-tuned model here \(config.json missing\); "
                                         r"run `ray-ft train JOB.yaml` first"):
        trained_model(cfg)
    (tmp_path / "x" / "train" / "model").mkdir(parents=True)
    (tmp_path / "x" / "train" / "model" / "config.json").write_text("{}")
    assert trained_model(cfg) == str(tmp_path / "x" / "train" / "model")
    assert trained_model(cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"models": ["base"]})})) is None


@pytest.mark.parametrize("method", ["lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, method):
    import torch

    from ray_ft.train.methods import build_model

    ids = torch.randint(5, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    grads = []
    for ckpt in (False, True):
        model, _ = build_model(str(tiny_model_dir), TrainConfig(finetuning_type=method, gradient_checkpointing=ckpt),
                               torch.float32)
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4)


def test_batched_validation_answers_equal_one_by_one_answers(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ray_ft.train.validation import greedy_answers

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 1000, (n,), generator=g).tolist() for n in (7, 19, 3, 12, 19)]  # ragged
    one_by_one = greedy_answers(model, tok, prompts, 8, batch_size=1, device="cpu")
    batched = greedy_answers(model, tok, prompts, 8, batch_size=4, device="cpu")  # left padded, 2 calls
    assert batched == one_by_one and len(set(one_by_one)) > 1
