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
    from ray_ft.pipeline import served_models

    monkeypatch.chdir(tmp_path)
    for folder, marker in (("merged", "config.json"), ("trained", "adapter_config.json")):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / marker).write_text("{}")  # a model folder, an adapter folder
    cfg = parse_job({"name": "job", "eval": {"adapters": {"remote": "s3://b/a", "local": "rel/ad"}},
                     "serve": {"models": {"merged": "merged"}}})
    extra = {"remote": "s3://b/a", "local": str(tmp_path / "rel" / "ad")}
    whole = {"merged": str(tmp_path / "merged")}
    assert served_models(cfg, "trained") == ({"job": str(tmp_path / "trained"), **extra}, whole)
    assert served_models(cfg, None) == (extra, whole)
    # A freeze/full fine-tune is a whole model: served on an engine of its own, under the job's name.
    assert served_models(cfg, "merged") == (extra, {"job": str(tmp_path / "merged"), **whole})
