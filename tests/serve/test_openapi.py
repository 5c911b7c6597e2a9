"""The published OpenAPI schema says what the ingress does, and schemathesis holds it to that:
every request generated from the schema (valid ones, and ones broken on purpose) gets a 2xx or a
documented 4xx with the OpenAI error body, never a 5xx, and every answer matches the schema.
Here against the ingress with fake deployments (no Ray, fast); tests/serve/test_api_fuzz.py runs
the same against the real graph."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from pydantic import SecretStr

from ray_ft.serve.ingress import IngressSettings, LiveAdapterSettings, RAGService, build_api
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.serve.protocols import Hit
from ray_ft.testing import api_checks
from tests.serve.fakes import FakeHandle
from tests.serve.test_ingress import BASE, FakeGenerator, FlakyEmbedder

TOKEN = "fuzz-token"
HEADERS = {"Authorization": f"Bearer {TOKEN}"}
FIXED_ADAPTER = "tuned"


class FakeKnowledgeBase:
    """A retriever over an in-memory document store, as the LanceDB-backed one answers."""

    def __init__(self):
        self.docs: dict[str, str] = {"d0": "Mount Everest is 8,849 metres tall."}
        self.version = 1

    async def retrieve(self, query, top_k):
        return [Hit(i, t, 1.0 - n / 10) for n, (i, t) in enumerate(list(self.docs.items())[:top_k])]

    async def add_documents(self, docs):
        self.docs.update({d["id"]: d["text"] for d in docs})
        self.version += 1
        return {"documents": len(docs), "nodes": len(docs), "removed_nodes": 0, "version": self.version}

    async def delete_document(self, document_id):
        gone = int(self.docs.pop(document_id, None) is not None)
        self.version += gone
        return {"id": document_id, "deleted_nodes": gone, "version": self.version}


class FakeReranker:
    async def rerank(self, query, texts):
        return np.array([float(len(t) % 7) for t in texts], dtype=np.float32)


def _app(tmp_path, tiny_model_dir, auth: bool = True):
    live = LiveAdapterSettings(str(tmp_path / "adapters.json"), (str(tmp_path / "adapters"),), ("s3",),
                               str(tiny_model_dir), 8, (BASE, FIXED_ADAPTER))
    s = IngressSettings(base_name=BASE, prompt=RAGPrompt("en", "sys"), top_k=2, max_tokens=8, max_tokens_limit=64,
                        max_input_chars=2000, max_embed_inputs=16, max_rerank_documents=16,
                        auth_token=SecretStr(TOKEN) if auth else None, model_names=(BASE, FIXED_ADAPTER),
                        rerank_candidates=3, live_adapters=live)
    service = RAGService(FakeHandle(FakeGenerator()), FakeHandle(FakeKnowledgeBase()), FakeHandle(FlakyEmbedder()),
                         s, reranker=FakeHandle(FakeReranker()))
    return build_api(service)


def test_the_schema_lists_every_route_its_errors_auth_and_limits(tmp_path, tiny_model_dir):
    spec = TestClient(_app(tmp_path, tiny_model_dir)).get("/openapi.json", headers=HEADERS).json()
    routes = {(p, m) for p, ops in spec["paths"].items() for m in ops}
    assert routes == {("/healthz", "get"), ("/v1/models", "get"), ("/v1/chat/completions", "post"),
                      ("/v1/embeddings", "post"), ("/v1/retrieve", "post"), ("/v1/rerank", "post"),
                      ("/v1/documents", "post"), ("/v1/documents/{document_id}", "delete"),
                      ("/v1/adapters", "post"), ("/v1/adapters/{name}", "delete"), ("/v1/rag", "post")}
    ops = {(p, m): op for p, o in spec["paths"].items() for m, op in o.items()}
    for (path, method), op in ops.items():
        assert "422" not in op["responses"], path  # refusals are 400s
        if path == "/healthz":
            assert set(op["responses"]) == {"200"} and "security" not in op
            continue
        assert op["security"] == [{"bearer": []}]
        assert {"200", "400", "401", "413", "503", "504"} <= set(op["responses"]), path
        assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"}
    assert set(ops["/v1/adapters", "post"]["responses"]) >= {"403", "404", "409"}
    assert "text/event-stream" in ops["/v1/chat/completions", "post"]["responses"]["200"]["content"]
    schemas = spec["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    chat_max = schemas["ChatCompletionRequest"]["properties"]["max_tokens"]["anyOf"]
    assert {"type": "integer", "minimum": 1, "maximum": 64} in chat_max
    emb_input = schemas["EmbeddingRequest"]["properties"]["input"]["anyOf"]
    assert any(b.get("type") == "array" and (b["minItems"], b["maxItems"]) == (1, 16) for b in emb_input)

    open_spec = TestClient(_app(tmp_path, tiny_model_dir, auth=False)).get("/openapi.json").json()
    assert "securitySchemes" not in open_spec["components"]
    assert all("security" not in op for o in open_spec["paths"].values() for op in o.values())


CHECKS = api_checks()

# schemathesis's lazy pytest loader (from_fixture) fails on pytest 9 (it sets the removed
# Function._nodeid), so the app is built once when the module loads and its schema read eagerly.
_FUZZ_ROOT = Path(tempfile.mkdtemp(prefix="ray_ft_fuzz_"))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_FUZZ_ROOT, _FUZZ_ROOT / "no-base-model"),
                                        headers=HEADERS)


@schema.parametrize()
@settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_every_generated_request_gets_a_documented_answer(case):
    case.call_and_validate(headers=HEADERS, **CHECKS)
