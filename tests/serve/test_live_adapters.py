"""Adapters registered while serving: allowed locations only, adapters checked against the
served base before any engine sees them (rank, shapes, torn weights), the registry file every
engine replica follows, and POST/DELETE /v1/adapters (fake engine handles: no Ray, no vLLM)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os

import pytest
from pydantic import SecretStr

from ray_ft.serve.adapter_registry import (
    AdapterRegistry, BadAdapter, check_adapter_files, check_location, check_live_adapter,
)
from ray_ft.serve.ingress import IngressSettings, LiveAdapterSettings, RAGService, build_api
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.testing import make_random_lora_adapter
from tests.serve.fakes import FakeHandle
from tests.serve.test_ingress import BASE, FakeGenerator, FakeRetriever, FlakyEmbedder

TOKEN = "tok-adapters"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Under an allowed root: a good rank-8 adapter of the tiny base, one made for a base of other
    widths, a copy with its weights cut in half, and a copy whose config claims rank 16."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("allowed")
    make_random_lora_adapter(tiny_model_dir, root / "good")
    other = tmp_path_factory.mktemp("other_base")
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(other)
    make_random_lora_adapter(other, root / "other_base")
    shutil.copytree(root / "good", root / "torn")
    weights = root / "torn" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(root / "good", root / "rank16")
    cfg = json.loads((root / "rank16" / "adapter_config.json").read_text())
    (root / "rank16" / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    return root


def test_locations_must_stay_under_an_allowed_root_or_use_an_allowed_scheme(tmp_path, adapters):
    roots = [str(adapters)]
    assert check_location(str(adapters / "good"), roots, []) == str((adapters / "good").resolve())
    for bad in [str(tmp_path), str(adapters / ".." / "elsewhere"), "/etc"]:
        with pytest.raises(BadAdapter, match="not under an allowed root"):
            check_location(bad, roots, [])
    link = adapters / "escape"
    os.symlink(tmp_path, link)
    with pytest.raises(BadAdapter, match="not under an allowed root"):  # symlinks are resolved
        check_location(str(link), roots, [])
    with pytest.raises(BadAdapter, match="scheme 's3' is not allowed"):
        check_location("s3://bucket/adapter", roots, [])
    assert check_location("s3://bucket/adapter", roots, ["s3"]) == "s3://bucket/adapter"
    with pytest.raises(BadAdapter, match="'..' segments"):
        check_location("s3://bucket/a/../b", roots, ["s3"])


def test_an_adapter_must_fit_the_served_base(adapters, tiny_model_dir):
    base = str(tiny_model_dir)
    assert check_adapter_files(str(adapters / "good"), base, 16)["r"] == 8
    with pytest.raises(BadAdapter, match="rank r=16 exceeds the engine's max_lora_rank=8"):
        check_adapter_files(str(adapters / "rank16"), base, 8)
    with pytest.raises(BadAdapter, match="does not fit the served base model"):
        check_adapter_files(str(adapters / "other_base"), base, 16)
    with pytest.raises(BadAdapter, match="corrupt weights"):
        check_adapter_files(str(adapters / "torn"), base, 16)
    with pytest.raises(BadAdapter, match="no LoRA adapter here"):
        check_live_adapter(str(adapters), [str(adapters)], [], base, 16)


def _add(path, name, location):
    AdapterRegistry(path).add(name, location)


def test_the_registry_is_shared_and_two_writers_lose_nothing(tmp_path):
    path = str(tmp_path / "serve" / "adapters.json")
    reader = AdapterRegistry(path)
    assert reader.read() == {}
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_add, args=(path, f"a{i}", f"/x/{i}")) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert reader.read() == {f"a{i}": f"/x/{i}" for i in range(4)}
    assert AdapterRegistry(path).remove("a1") and not AdapterRegistry(path).remove("a1")
    assert set(reader.read()) == {"a0", "a2", "a3"}


def test_an_engine_follows_the_registry(tmp_path, adapters):
    """VLLMGenerator's bookkeeping without an engine: a registered name gets a LoRARequest with a
    fresh id, a re-pointed one a new request, a removed one is gone."""
    from ray_ft.serve.engines import VLLMGenerator

    gen = VLLMGenerator.__new__(VLLMGenerator)
    gen.base_name, gen.loras, gen.live, gen._next_id = "base", {}, {}, 2
    gen.registry = AdapterRegistry(str(tmp_path / "adapters.json"))
    registry = AdapterRegistry(str(tmp_path / "adapters.json"))
    assert gen.model_names() == ["base"]
    registry.add("live", str(adapters / "good"))
    assert gen.model_names() == ["base", "live"] and gen.loras["live"].lora_int_id == 2
    registry.add("live", str(adapters / "rank16"))
    gen._sync_live()
    assert gen.loras["live"].lora_path == str(adapters / "rank16") and gen.loras["live"].lora_int_id == 3
    registry.remove("live")
    assert gen.model_names() == ["base"]


def _client(tmp_path, adapters, tiny_model_dir, token=TOKEN, enabled=True):
    live = LiveAdapterSettings(str(tmp_path / "adapters.json"), (str(adapters),), ("s3",), str(tiny_model_dir), 8,
                               (BASE, "tuned")) if enabled else None
    settings = IngressSettings(base_name=BASE, prompt=RAGPrompt("en", "sys"), top_k=1, max_tokens=8,
                               max_tokens_limit=64, auth_token=SecretStr(token) if token else None,
                               live_adapters=live, model_names=(BASE, "tuned"))
    service = RAGService(FakeHandle(FakeGenerator()), FakeHandle(FakeRetriever()), FakeHandle(FlakyEmbedder()),
                         settings)
    from fastapi.testclient import TestClient

    return TestClient(build_api(service))


def test_post_and_delete_adapters_over_http(tmp_path, adapters, tiny_model_dir):
    http = _client(tmp_path, adapters, tiny_model_dir)
    ok = http.post("/v1/adapters", headers=AUTH, json={"name": "weekly-2026-49", "location": str(adapters / "good")})
    assert ok.status_code == 200 and ok.json() == {"id": "weekly-2026-49", "object": "model",
                                                  "location": str((adapters / "good").resolve())}
    assert AdapterRegistry(str(tmp_path / "adapters.json")).read() == {"weekly-2026-49": ok.json()["location"]}
    cases = [
        ({"name": "../x", "location": str(adapters / "good")}, 400, "may not contain '..'"),
        ({"name": "a/b", "location": str(adapters / "good")}, 400, "must match"),
        ({"name": BASE, "location": str(adapters / "good")}, 409, "served by the job's own config"),
        ({"name": "tuned", "location": str(adapters / "good")}, 409, "served by the job's own config"),
        ({"name": "a", "location": str(tmp_path)}, 400, "not under an allowed root"),
        ({"name": "a", "location": str(adapters / "rank16")}, 400, "exceeds the engine's max_lora_rank=8"),
        ({"name": "a", "location": str(adapters / "torn")}, 400, "corrupt weights"),
        ({"name": "a", "location": str(adapters / "other_base")}, 400, "does not fit the served base model"),
        ({"name": "a", "location": "gs://bucket/adapter"}, 400, "scheme 'gs' is not allowed"),
        ({"name": "a", "location": "x\u0000y"}, 400, "contains a NUL character"),  # found by schemathesis
        ({"name": "a"}, 400, "location"),
    ]
    for body, status, fragment in cases:
        resp = http.post("/v1/adapters", headers=AUTH, json=body)
        assert resp.status_code == status and fragment in resp.json()["error"]["message"], (body, resp.text)
    assert http.delete("/v1/adapters/weekly-2026-49", headers=AUTH).json()["deleted"] is True
    gone = http.delete("/v1/adapters/weekly-2026-49", headers=AUTH)
    assert gone.status_code == 404 and "no live adapter 'weekly-2026-49'" in gone.json()["error"]["message"]
    assert http.delete("/v1/adapters/tuned", headers=AUTH).status_code == 409
    assert http.post("/v1/adapters", json={"name": "a", "location": "x"}).status_code == 401


def test_adapter_registration_is_off_without_auth_or_the_setting(tmp_path, adapters, tiny_model_dir):
    body = {"name": "a", "location": str(adapters / "good")}
    resp = _client(tmp_path, adapters, tiny_model_dir, token=None).post("/v1/adapters", json=body)
    assert resp.status_code == 403 and "bearer auth" in resp.json()["error"]["message"]
    resp = _client(tmp_path, adapters, tiny_model_dir, enabled=False).post("/v1/adapters", headers=AUTH, json=body)
    assert resp.status_code == 404 and "serve.live_adapters.enabled" in resp.json()["error"]["message"]
    from ray_ft.config import parse_job
    from ray_ft.errors import RayFTError

    with pytest.raises(RayFTError, match="live_adapters.enabled needs auth_token_env"):
        parse_job({"name": "x", "serve": {"live_adapters": {"enabled": True}}})


@pytest.mark.slow
def test_an_adapter_registered_on_the_real_graph_is_served_without_a_redeploy(served, smollm_dir):
    """vLLM loads the registered adapter on its first request: its greedy answer is the
    transformers + peft one; a torn adapter is refused before the engine sees it, and the engine
    keeps serving; a removed adapter is a 404 at once."""
    import shutil
    from pathlib import Path

    import httpx
    from transformers import AutoTokenizer

    from tests.serve.conftest import QUESTION, _peft_greedy

    root, tok = Path(served.live_root), AutoTokenizer.from_pretrained(smollm_dir)
    for seed in range(7, 12):  # an adapter whose greedy answer differs from the base's (transformers + peft)
        peft_model = make_random_lora_adapter(smollm_dir, root / "weekly", std=0.05, seed=seed)
        expected = _peft_greedy(peft_model, tok, QUESTION, 8)
        with peft_model.disable_adapter():
            if _peft_greedy(peft_model, tok, QUESTION, 8) != expected:
                break
    else:
        pytest.fail("no seeded adapter changed the base's greedy answer")
    shutil.copytree(root / "weekly", root / "torn")
    weights = root / "torn" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    chat = {"model": "weekly", "max_tokens": 8, "temperature": 0.0, "messages": [{"role": "user", "content": QUESTION}]}
    with httpx.Client(base_url=served.url, timeout=300, headers=served.headers) as http:
        assert http.post("/v1/chat/completions", json=chat).status_code == 404
        added = http.post("/v1/adapters", json={"name": "weekly", "location": str(root / "weekly")})
        assert added.status_code == 200, added.text
        try:
            assert "weekly" in [m["id"] for m in http.get("/v1/models").json()["data"]]
            answer = http.post("/v1/chat/completions", json=chat).json()["choices"][0]["message"]["content"]
            assert answer == expected
            torn = http.post("/v1/adapters", json={"name": "torn", "location": str(root / "torn")})
            assert torn.status_code == 400 and "corrupt weights" in torn.json()["error"]["message"]
            base = http.post("/v1/chat/completions", json={**chat, "model": "SmolLM2-135M-Instruct"})
            assert base.status_code == 200 and base.json()["choices"][0]["message"]["content"] != expected
        finally:
            removed = http.delete("/v1/adapters/weekly")
        assert removed.status_code == 200
        assert http.post("/v1/chat/completions", json=chat).status_code == 404
        assert "weekly" not in [m["id"] for m in http.get("/v1/models").json()["data"]]


def test_a_registered_name_is_routed_to_the_base_engine_and_an_unknown_one_is_a_404(tmp_path, adapters,
                                                                                   tiny_model_dir):
    http = _client(tmp_path, adapters, tiny_model_dir)
    chat = {"model": "live", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    unknown = http.post("/v1/chat/completions", headers=AUTH, json=chat)
    assert unknown.status_code == 404 and "unknown model 'live'" in unknown.json()["error"]["message"]
    assert http.post("/v1/adapters", headers=AUTH, json={"name": "live", "location": str(adapters / "good")}).status_code == 200
    # The fake engine serves only its own names: reaching it (its own 404 text) shows the ingress let it through.
    through = http.post("/v1/chat/completions", headers=AUTH, json=chat)
    assert through.status_code == 404 and "served: base-model, tuned" in through.json()["error"]["message"]
