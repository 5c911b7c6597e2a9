"""Live document updates over HTTP: POST /v1/documents and DELETE /v1/documents/{id} write the
LanceDB knowledge base through the retriever (real LanceDB, a letter-count fake embedder, fake
handles: no Ray), and what they write is what /v1/retrieve finds next."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from ray_ft.config import RetrievalSettings
from ray_ft.data.nodes import build_nodes
from ray_ft.kb.store import KnowledgeBase, node_row
from ray_ft.serve.ingress import IngressSettings, RAGService, build_api
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.serve.retriever import RetrieverDeployment
from tests.serve.fakes import FakeHandle
from tests.serve.test_retrieval import DOCS, CountingEmbedder

TOKEN = "tok-docs"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _graph(tmp_path, token=TOKEN, node_group="passage"):
    emb = CountingEmbedder()
    uri = str(tmp_path / "kb.lance")
    kb = KnowledgeBase(uri, "nodes_passage", "e1", None, language="en")
    nodes = build_nodes(DOCS, "passage")
    kb.upsert([node_row(n) for n in nodes], asyncio.run(emb.embed([n["text"] for n in nodes])))
    kb.ensure_indexes()
    spec = {"uri": uri, "table": "nodes_passage", "fingerprint": "e1", "cfg": {"refresh_s": 0},
            "language": "en"}
    retriever = RetrieverDeployment.func_or_class(
        spec, node_group, FakeHandle(emb), 30.0, 1, RetrievalSettings(mode="dense").model_dump())
    settings = IngressSettings(base_name="base", prompt=RAGPrompt("en", "sys"), top_k=1, max_tokens=8, max_tokens_limit=64,
                               auth_token=SecretStr(token) if token else None,
                               max_embed_inputs=3, max_input_chars=400)
    service = RAGService(FakeHandle(object()), FakeHandle(retriever), FakeHandle(emb), settings)
    return TestClient(build_api(service)), emb


def _top(http, query):
    resp = http.post("/v1/retrieve", json={"query": query, "top_k": 1}, headers=AUTH)
    assert resp.status_code == 200, resp.text
    return resp.json()["contexts"][0]


def test_added_replaced_and_deleted_documents_are_what_retrieval_sees_next(tmp_path):
    http, emb = _graph(tmp_path)
    assert _top(http, "zebra zoo")["node_id"] != "zoo"
    texts_before = emb.texts
    resp = http.post("/v1/documents", headers=AUTH, json={"documents": [
        {"id": "zoo", "text": "Zebras and zebu live in the zoo.", "metadata": {"page": 3}}]})
    assert resp.status_code == 200, resp.text
    assert resp.json()["documents"] == 1 and resp.json()["nodes"] == 1 and resp.json()["removed_nodes"] == 0
    assert emb.texts == texts_before + 1  # the new node only, not the knowledge base
    assert _top(http, "zebra zoo")["node_id"] == "zoo"

    replaced = http.post("/v1/documents", headers=AUTH, json={"documents": [
        {"id": "zoo", "text": "Quokkas hop quietly in Queensland."}]})
    assert replaced.status_code == 200 and replaced.json()["version"] > resp.json()["version"]
    hit = _top(http, "quokka quietly")
    assert hit["node_id"] == "zoo" and hit["text"] == "Quokkas hop quietly in Queensland."

    gone = http.delete("/v1/documents/zoo", headers=AUTH)
    assert gone.status_code == 200 and gone.json()["deleted_nodes"] == 1
    assert _top(http, "quokka quietly")["node_id"] != "zoo"
    again = http.delete("/v1/documents/zoo", headers=AUTH)
    assert again.status_code == 404 and again.json()["error"]["message"] == "no document 'zoo' in the knowledge base"


def test_a_replaced_chunked_document_loses_the_chunks_its_new_text_has_not(tmp_path):
    from ray_ft.config import NodeGroupConfig

    http, _ = _graph(tmp_path, node_group=NodeGroupConfig(kind="chunk", chunk_size=40, chunk_overlap=0))
    long = " ".join(["alpha beta gamma delta epsilon."] * 6)
    first = http.post("/v1/documents", headers=AUTH, json={"documents": [{"id": "long", "text": long}]})
    assert first.status_code == 200 and first.json()["nodes"] >= 4
    short = http.post("/v1/documents", headers=AUTH, json={"documents": [{"id": "long", "text": "alpha beta."}]})
    assert short.json() | {"version": 0} == {"documents": 1, "nodes": 1, "removed_nodes": first.json()["nodes"] - 1,
                                             "version": 0}


@pytest.mark.parametrize("body, status, fragment", [
    ({"documents": []}, 400, "documents"),
    ({"documents": [{"id": "a", "text": ""}]}, 400, "text"),
    ({"documents": [{"id": "a", "text": 5}]}, 400, "text"),
    ({"documents": [{"id": "a", "text": "x", "extra": 1}]}, 400, "extra"),
    ({"documents": [{"id": str(i), "text": "x"} for i in range(4)]}, 400, "documents: 4 exceed the limit of 3"),
    ({"documents": [{"id": "a", "text": "x" * 401}]}, 400, "401 characters exceed the limit of 400"),
    ({"documents": [{"id": "it's", "text": "quotes in ids are data, not SQL"}]}, 200, None),
])
def test_bad_document_requests_are_4xx_with_a_reason_and_the_service_keeps_serving(tmp_path, body, status, fragment):
    http, _ = _graph(tmp_path)
    resp = http.post("/v1/documents", headers=AUTH, json=body)
    assert resp.status_code == status, resp.text
    if fragment:
        assert fragment in resp.json()["error"]["message"]
    assert http.post("/v1/retrieve", json={"query": "dog", "top_k": 1}, headers=AUTH).status_code == 200


def test_a_repeated_id_in_one_request_is_one_document_the_last_given(tmp_path):
    http, _ = _graph(tmp_path)
    docs = [{"id": "pet", "text": "The cat sleeps all day."}, {"id": "other", "text": "Rivers flow to the sea."},
            {"id": "pet", "text": "The dog barks at night."}]
    resp = http.post("/v1/documents", headers=AUTH, json={"documents": docs})
    assert resp.status_code == 200 and resp.json()["documents"] == 2
    hit = http.post("/v1/retrieve", json={"query": "dog barks", "top_k": 20}, headers=AUTH).json()["contexts"]
    texts = [c["text"] for c in hit]
    assert "The dog barks at night." in texts and "The cat sleeps all day." not in texts


def test_writes_need_auth(tmp_path):
    http, _ = _graph(tmp_path)
    assert http.post("/v1/documents", json={"documents": [{"id": "a", "text": "x"}]}).status_code == 401
    open_http, _ = _graph(tmp_path / "open", token=None)
    resp = open_http.post("/v1/documents", json={"documents": [{"id": "a", "text": "x"}]})
    assert resp.status_code == 403 and "bearer auth (serve.auth_token_env)" in resp.json()["error"]["message"]
    assert open_http.delete("/v1/documents/a").status_code == 403
