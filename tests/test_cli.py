"""Bad input to every command ends in one line on stderr that names the file/record/field."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import make_squad


def ray_ft(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "ray_ft.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    return proc.returncode, proc.stdout, proc.stderr.strip()


def _job(tmp_path: Path, source: Path, **model) -> Path:
    job = tmp_path / "job.yaml"
    lines = ["name: cli", f"output_dir: {tmp_path / 'runs'}", "data:", f"  source: {source}"]
    if model:
        lines += ["model:", f"  name: {model['name']}"]
    job.write_text("\n".join(lines) + "\n")
    return job


def _assert_one_line(code, err, *fragments):
    assert code == 2, err
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for f in fragments:
        assert f in err, err


def test_missing_job_file_and_unknown_key(tmp_path):
    code, _, err = ray_ft("run", str(tmp_path / "nope.yaml"))
    _assert_one_line(code, err, "nope.yaml: job file not found")
    job = tmp_path / "k.yaml"
    job.write_text("name: x\nserve:\n  top_kk: 3\n")
    code, _, err = ray_ft("prepare", str(job))
    _assert_one_line(code, err, "k.yaml: field 'serve.top_kk': unknown key")


def test_missing_data_file_invalid_json_and_no_answers(tmp_path):
    code, _, err = ray_ft("prepare", str(_job(tmp_path, tmp_path / "absent.json")))
    _assert_one_line(code, err, "absent.json: file not found")

    broken = tmp_path / "broken.json"
    broken.write_text('{"data": [1, 2,, 3]}')
    code, _, err = ray_ft("run", str(_job(tmp_path, broken)))
    _assert_one_line(code, err, "broken.json: invalid JSON at line 1 column 16: Expecting value")

    noans = tmp_path / "noans.json"
    make_squad(noans, [("ctx", [("ok1", "q?", "ctx")])])
    doc = json.loads(noans.read_text())
    doc["data"][0]["paragraphs"][0]["qas"].append({"id": "bad7", "question": "q2?", "answers": []})
    noans.write_text(json.dumps(doc))
    code, _, err = ray_ft("train", str(_job(tmp_path, noans)))
    _assert_one_line(code, err, "noans.json: data[0].paragraphs[0].qas[1] (id=bad7): field 'answers' is empty")


def test_unknown_model_name(tmp_path):
    data = make_squad(tmp_path / "d.json", [("ctx", [("a", "q?", "ctx")])])
    code, _, err = ray_ft("prepare", str(_job(tmp_path, data, name="NoSuchModel-7B")))
    _assert_one_line(code, err, "model 'NoSuchModel-7B' not found; tried:", "packaged models")
    code, _, err = ray_ft("models", "pull", "NoSuchModel-7B")
    _assert_one_line(code, err, "model 'NoSuchModel-7B' not found")


def test_eval_without_a_trained_adapter_fails_before_starting_anything(tmp_path):
    data = make_squad(tmp_path / "d.json", [("ctx", [("a", "q?", "ctx")])])
    code, _, err = ray_ft("eval", str(_job(tmp_path, data)))
    _assert_one_line(code, err, f"{tmp_path / 'runs' / 'cli' / 'train' / 'adapter'}: no LoRA adapter here",
                     "run `ray-ft train JOB.yaml` first or set eval.adapter")
    assert not (tmp_path / "runs").exists()


def test_kb_build_without_prepared_data_names_the_missing_file(tmp_path):
    data = make_squad(tmp_path / "d.json", [("ctx", [("a", "q?", "ctx")])])
    code, _, err = ray_ft("kb", "build", str(_job(tmp_path, data)))
    _assert_one_line(code, err, f"{tmp_path / 'runs' / 'cli' / 'data' / 'knowledge_base.jsonl'}: no knowledge base",
                     "run `ray-ft prepare")
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_models_list_and_pull(smollm_dir):
    code, out, _ = ray_ft("models", "list")
    assert code == 0
    rows = {line.split()[0]: line for line in out.splitlines()}
    assert set(rows) == {"SmolLM2-135M-Instruct", "all-MiniLM-L6-v2", "Qwen2.5-Coder-0.5B-Instruct"}
    assert str(smollm_dir) in rows["SmolLM2-135M-Instruct"]
    code, out, _ = ray_ft("models", "pull", "SmolLM2-135M-Instruct")
    assert code == 0 and out.strip() == str(smollm_dir)


def test_model_without_chat_template_fails_before_ray(tmp_path, smollm_dir):
    import shutil

    bare = tmp_path / "bare_model"
    bare.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(smollm_dir / name, bare / name)
    tok_cfg = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)  # the template lives in chat_template.jinja, not copied
    (bare / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    data = make_squad(tmp_path / "d.json", [("ctx", [("a", "q?", "ctx")])])
    code, _, err = ray_ft("prepare", str(_job(tmp_path, data, name=str(bare))))
    _assert_one_line(code, err, "bare_model' has no chat template")
    assert not (tmp_path / "runs").exists()  # nothing written


def test_recipes_lists_every_registered_method_and_a_bad_pairs_file_is_one_line(tmp_path):
    code, out, _ = ray_ft("recipes")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()] == ["sft", "dpo", "orpo", "embedding", "rerank"]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "Which port?", "chosen": "Kelby.", "rejected": "Kelby."}\n')
    job = tmp_path / "dpo.yaml"
    job.write_text(f"name: d\noutput_dir: {tmp_path / 'runs'}\ntrain:\n  method: dpo\n  preference:\n"
                   f"    source: {pairs.name}\n")
    _assert_one_line(*ray_ft("train", str(job))[::2], f"{pairs}: line 1", "are the same reply")
