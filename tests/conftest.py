"""Shared fixtures: one local Ray cluster per session, the real packaged models, a tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CMRC = ROOT.parent / "shared" / "datasets" / "cmrc2018" / "cmrc2018_dev.json"
FINQA = ROOT.parent / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session (4 logical CPUs, as `ray-ft` starts locally)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=True, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    from ray_ft.models import resolve_model

    return resolve_model("SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from ray_ft.models import resolve_model

    return resolve_model("all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm_dir) -> Path:
    """A 2-layer Llama with SmolLM2's tokenizer and chat template, random weights (seeded).

    initializer_range 0.5 (not 0.02): with tiny embeddings the logits of a 64-wide model cannot
    move far from uniform, and no adapter could lower the loss measurably in a few steps.
    """
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny_llama")
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, initializer_range=0.5, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def finqa_slice(path: Path, n: int) -> Path:
    """The first n rows of Financial-QA-10k as a CSV of their own."""
    import csv

    with FINQA.open(encoding="utf-8", newline="") as src, path.open("w", encoding="utf-8", newline="") as dst:
        reader = csv.DictReader(src)
        writer = csv.DictWriter(dst, fieldnames=reader.fieldnames)
        writer.writeheader()
        for i, row in enumerate(reader):
            if i == n:
                break
            writer.writerow(row)
    return path


def make_squad(path: Path, paragraphs: list[tuple[str, list[tuple[str, str, str]]]]) -> Path:
    """Write a SQuAD-style file: paragraphs = [(context, [(id, question, answer), ...]), ...]."""
    data = [{"title": f"t{i}", "paragraphs": [{
        "context": ctx,
        "qas": [{"id": qid, "question": q, "answers": [{"text": a, "answer_start": ctx.find(a)}]}
                for qid, q, a in qas],
    }]} for i, (ctx, qas) in enumerate(paragraphs)]
    path.write_text(json.dumps({"version": "v1", "data": data}, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.fixture
def cmrc_slice(tmp_path) -> Path:
    """The first 40 passages of the real CMRC2018 dev file (keeps Ray Data tests fast)."""
    doc = json.loads(CMRC.read_text(encoding="utf-8"))
    doc["data"] = doc["data"][:40]
    out = tmp_path / "cmrc_slice.json"
    out.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    return out


@pytest.fixture
def s3(monkeypatch):
    """A real S3 API on loopback (moto's server) and a pyarrow filesystem on it; yields
    (filesystem, URI query string that points pyarrow's s3:// URIs at it)."""
    import socket

    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    try:
        fs = pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{port}", scheme="http", region="us-east-1",
                               allow_bucket_creation=True)
        yield fs, f"?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    finally:
        server.stop()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
