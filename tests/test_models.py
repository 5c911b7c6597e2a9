import pytest

from ray_ft.errors import RayFTError
from ray_ft.models import PACKAGED, list_models, resolve_model


def test_unknown_model_lists_every_source_tried(tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_FT_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RayFTError) as err:
        resolve_model("acme/no-such-model")
    msg = str(err.value)
    assert msg.startswith("model 'acme/no-such-model' not found; tried: ")
    for part in ("local folder", "cache", "Hugging Face Hub 'acme/no-such-model'", "packaged models"):
        assert part in msg
    assert "\n" not in msg


def test_list_models_names_the_packaged_ones():
    names = {row["name"] for row in list_models()}
    assert names == set(PACKAGED) == {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2"}


@pytest.mark.slow
def test_hf_id_of_a_packaged_model_falls_back_to_the_wheel(smollm_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == smollm_dir


@pytest.mark.slow
def test_converted_smollm2_is_a_plain_hf_folder_that_answers(smollm_dir):
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm_dir / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["rope_theta"] == 100000.0
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm_dir, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
