"""Live documents on the real graph: a document POSTed to /v1/documents is embedded by the real
MiniLM deployment, written to the LanceDB table, and found by every retriever replica next."""

import httpx
import pytest

pytestmark = pytest.mark.slow


def test_a_posted_document_is_retrieved_next_and_a_deleted_one_is_gone(served):
    doc = {"id": "kilimanjaro", "text": "Kilimanjaro is a dormant volcano in Tanzania, 5,895 metres tall.",
           "metadata": {"source": "live"}}
    query = {"query": "Which volcano stands in Tanzania?", "top_k": 1, "rerank": False}
    with httpx.Client(base_url=served.url, timeout=120, headers=served.headers) as http:
        assert http.post("/v1/retrieve", json=query).json()["contexts"][0]["node_id"] != "kilimanjaro"
        added = http.post("/v1/documents", json={"documents": [doc]})
        assert added.status_code == 200, added.text
        assert added.json()["documents"] == 1 and added.json()["nodes"] == 1
        try:
            # Serve spreads the requests over the retriever's replicas: each sees the new version.
            tops = {http.post("/v1/retrieve", json=query).json()["contexts"][0]["node_id"] for _ in range(6)}
            assert tops == {"kilimanjaro"}
            rag = http.post("/v1/rag", json={**query, "max_tokens": 8}).json()
            assert rag["contexts"][0]["text"] == doc["text"]
            bad = http.post("/v1/documents", json={"documents": [{"id": "x", "text": ""}]})
            assert bad.status_code == 400 and "text" in bad.json()["error"]["message"]
            unauth = httpx.post(f"{served.url}/v1/documents", json={"documents": [doc]})
            assert unauth.status_code == 401
        finally:
            gone = http.delete("/v1/documents/kilimanjaro")
        assert gone.status_code == 200 and gone.json()["deleted_nodes"] == 1
        assert http.post("/v1/retrieve", json=query).json()["contexts"][0]["node_id"] != "kilimanjaro"
