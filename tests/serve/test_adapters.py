"""Adapters by location: local folders and object storage (a real S3 API on loopback)."""

import json
import time
from pathlib import Path

import pytest

from ray_ft.config import parse_job
from ray_ft.errors import RayFTError
from ray_ft.serve.adapters import check_adapter, fetch_adapter, has_adapter


def _upload(fs, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        with fs.open_output_stream(f"{prefix}/{name}") as f:
            f.write(data)


def test_remote_adapter_is_checked_fetched_once_and_refetched_when_it_changes(s3, tmp_path):
    fs, query = s3
    fs.create_dir("models")
    files = {"adapter_config.json": json.dumps({"r": 8}).encode(), "adapter_model.safetensors": b"\x00" * 4096,
             "tok/tokenizer.json": b"{}"}
    _upload(fs, "models/run1/adapter", files)
    uri = f"s3://models/run1/adapter{query}"
    assert has_adapter(uri) and not has_adapter(f"s3://models/run1/nothing{query}")
    assert check_adapter(uri, "eval.adapter: ") == uri  # URIs are passed on as they are
    with pytest.raises(RayFTError, match=r"^eval.adapters.x: s3://models/nope\?.*: no LoRA adapter here"):
        check_adapter(f"s3://models/nope{query}", "eval.adapters.x: ")

    local = Path(fetch_adapter(uri, tmp_path / "cache"))
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*") if p.is_file()} == files
    assert fetch_adapter(uri, tmp_path / "cache") == str(local)  # cached: same folder, no copy
    time.sleep(1.1)  # a new mtime for the re-trained adapter
    _upload(fs, "models/run1/adapter", {"adapter_model.safetensors": b"\x01" * 4096})
    again = Path(fetch_adapter(uri, tmp_path / "cache"))
    assert again != local and (again / "adapter_model.safetensors").read_bytes() == b"\x01" * 4096
    assert not list((tmp_path / "cache").glob(".*"))  # no temp folder left behind
    _upload(fs, "models/run2", {"readme.txt": b"no adapter"})
    with pytest.raises(RayFTError, match=r"^s3://models/run2\?.*: no LoRA adapter here"):
        fetch_adapter(f"s3://models/run2{query}", tmp_path / "cache")


def test_served_models_keep_uris_resolve_folders_and_give_whole_models_an_engine(tmp_path, monkeypatch):
    from ray_ft.served import served_models

    monkeypatch.chdir(tmp_path)
    for folder, marker in (("merged", "config.json"), ("trained", "adapter_config.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / marker).write_text("{}")  # a model folder, an adapter folder
    cfg = parse_job({"name": "job", "eval": {"adapters": {"remote": "s3://b/a", "local": "rel/ad"}},
                     "serve": {"models": {"merged": "merged"}, "finetuned_adapter": "unmerged"}})
    extra = {"remote": "s3://b/a", "local": str(tmp_path / "rel" / "ad")}
    whole = {"merged": str(tmp_path / "merged")}
    assert served_models(cfg, "trained") == ({"job": str(tmp_path / "trained"), **extra}, whole)
    assert served_models(cfg, None) == (extra, whole)
    # A freeze/full fine-tune is a whole model: served on an engine of its own, under the job's name.
    assert served_models(cfg, "merged") == (extra, {"job": str(tmp_path / "merged"), **whole})


def test_on_cpu_the_fine_tuned_adapter_is_served_merged_and_re_merged_only_when_it_changes(tmp_path, tiny_model_dir):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from ray_ft.served import finetuned_served_as, served_models

    def write_adapter(seed: int) -> Path:
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                               LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False))
        model.save_pretrained(tmp_path / "adapter")
        return tmp_path / "adapter"

    adapter = write_adapter(0)
    cfg = parse_job({"name": "job", "output_dir": str(tmp_path / "runs"), "model": {"name": str(tiny_model_dir)},
                     "eval": {"adapters": {"other": str(adapter)}}})
    assert finetuned_served_as(cfg) == "merged"  # auto on CPU
    adapters, whole = served_models(cfg, adapter)
    merged = tmp_path / "runs" / "job" / "serve" / "merged"
    assert whole == {"job": str(merged)} and adapters == {"other": str(adapter)}  # eval.adapters stay unmerged
    ids = torch.tensor([[5, 9, 14, 3, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(adapter)).eval()
    served = AutoModelForCausalLM.from_pretrained(merged).eval()
    with torch.no_grad():
        torch.testing.assert_close(served(ids).logits, peft(ids).logits, atol=1e-4, rtol=1e-4)
    first = (merged / "model.safetensors").stat().st_mtime_ns
    served_models(cfg, adapter)
    assert (merged / "model.safetensors").stat().st_mtime_ns == first  # unchanged adapter: no re-merge
    time.sleep(0.01)
    write_adapter(1)
    served_models(cfg, adapter)
    assert (merged / "model.safetensors").stat().st_mtime_ns != first  # re-trained: merged again
    on_gpu = cfg.model_copy(update={"train": cfg.train.model_copy(update={"use_gpu": True})})
    assert finetuned_served_as(on_gpu) == "unmerged"
    assert served_models(on_gpu, adapter) == ({"job": str(adapter), "other": str(adapter)}, {})
