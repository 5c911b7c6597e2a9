"""Reranking in the ingress against fake deployments: the retriever fetches the candidates, the
reranker's order is what /v1/rag and /v1/retrieve return (both stages' scores kept), and
/v1/rerank answers in the common shape and refuses bad requests with a 4xx. No Ray, no model."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ray_ft.serve.ingress import IngressSettings, RAGService, build_api
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.serve.protocols import Completion, Hit
from tests.serve.fakes import FakeHandle

BASE = "base-model"


class Generator:
    def __init__(self):
        self.seen: list[list[dict]] = []

    def model_names(self):
        return [BASE]

    async def generate(self, messages, model, max_tokens, temperature, structured=None, sampling=None):
        self.seen.append(messages)
        return Completion("answer", model, 10, 1, "stop")


class Retriever:
    """Passage i scores 1 - i/100 in the first stage: n0 first."""

    def __init__(self):
        self.asked: list[int] = []

    async def retrieve(self, query, top_k):
        self.asked.append(top_k)
        return [Hit(f"n{i}", f"passage {i}", 1.0 - i / 100) for i in range(top_k)]


class Reranker:
    """Relevance = the passage number's last digit / 10: the first stage's order reversed in
    blocks (passage 9 first, then 19, ...); ties are possible (9 and 19)."""

    def __init__(self):
        self.calls: list[tuple[str, list[str]]] = []

    async def rerank(self, query, passages):
        self.calls.append((query, list(passages)))
        return np.array([int(p.split()[-1]) % 10 / 10 for p in passages])


def _service(reranker=True, **overrides):
    settings = IngressSettings(**{
        "base_name": BASE, "prompt": RAGPrompt("en", "sys"), "top_k": 2, "max_tokens": 8, "max_tokens_limit": 64,
        "rerank_candidates": 12 if reranker else None, "max_rerank_documents": 5, **overrides})
    parts = Generator(), Retriever(), Reranker() if reranker else None
    service = RAGService(FakeHandle(parts[0]), FakeHandle(parts[1]), FakeHandle(object()), settings,
                         reranker=FakeHandle(parts[2]) if reranker else None)
    return TestClient(build_api(service)), parts


def test_rag_and_retrieve_return_the_rerankers_order_with_both_stages_scores():
    http, (generator, retriever, reranker) = _service()
    out = http.post("/v1/rag", json={"query": "q"}).json()
    assert retriever.asked == [12]  # rerank_candidates fetched, though top_k is 2
    assert reranker.calls == [("q", [f"passage {i}" for i in range(12)])]
    # passage 9 (0.9) then 8 (0.8); 11 scores 0.1 and 10 scores 0.0
    assert [c["node_id"] for c in out["contexts"]] == ["n9", "n8"]
    first = out["contexts"][0]
    assert first["rerank_score"] == pytest.approx(0.9) and first["score"] == first["rerank_score"]
    assert first["retrieval_rank"] == 9 and first["retrieval_score"] == pytest.approx(0.91)
    # the generator saw the reranked passages, best first
    assert generator.seen[0][-1]["content"].index("passage 9") < generator.seen[0][-1]["content"].index("passage 8")

    got = http.post("/v1/retrieve", json={"query": "q", "top_k": 4}).json()["contexts"]
    assert [c["node_id"] for c in got] == ["n9", "n8", "n7", "n6"]
    # per request: the first stage alone, in its order, with no reranker call
    plain = http.post("/v1/retrieve", json={"query": "q", "top_k": 3, "rerank": False}).json()["contexts"]
    assert [c["node_id"] for c in plain] == ["n0", "n1", "n2"] and plain[0]["rerank_score"] is None
    assert retriever.asked[-1] == 3 and len(reranker.calls) == 2


def test_ties_keep_the_first_stage_order():
    http, _ = _service(rerank_candidates=20)
    got = http.post("/v1/retrieve", json={"query": "q", "top_k": 3}).json()["contexts"]
    assert [c["node_id"] for c in got] == ["n9", "n19", "n8"]  # 9 and 19 tie at 0.9


def test_rerank_endpoint_orders_documents_and_honours_top_n():
    http, (_, _, reranker) = _service()
    docs = ["passage 3", "passage 7", "passage 5"]
    out = http.post("/v1/rerank", json={"query": "q", "documents": docs, "top_n": 2}).json()
    assert out["id"].startswith("rerank-") and out["model"] == "reranker"
    assert [(r["index"], r["document"]["text"]) for r in out["results"]] == [(1, "passage 7"), (2, "passage 5")]
    assert [r["relevance_score"] for r in out["results"]] == pytest.approx([0.7, 0.5])
    # Cohere v2 / Jina documents as objects; without return_documents no text is echoed
    bare = http.post("/v1/rerank", json={"query": "q", "documents": [{"text": d} for d in docs],
                                         "return_documents": False}).json()
    assert bare["results"] == [{"index": 1, "relevance_score": pytest.approx(0.7)},
                               {"index": 2, "relevance_score": pytest.approx(0.5)},
                               {"index": 0, "relevance_score": pytest.approx(0.3)}]
    assert len(reranker.calls) == 2


@pytest.mark.parametrize("body, status, says", [
    ({"query": "q", "documents": []}, 400, "documents must hold 1 to 5"),
    ({"query": "q", "documents": ["d"] * 6}, 400, "documents must hold 1 to 5"),
    ({"query": "q", "documents": ["x" * 200]}, 400, "exceed the limit of 100"),
    ({"query": "q", "documents": "one text"}, 400, "documents"),
    ({"query": "q", "documents": [1, 2]}, 400, "documents.0"),
    ({"query": "", "documents": ["d"]}, 400, "query"),
    ({"query": "q", "documents": ["d"], "top_n": 0}, 400, "top_n"),
    ({"documents": ["d"]}, 400, "query"),
])
def test_bad_rerank_requests_get_a_4xx_that_says_why(body, status, says):
    http, (_, _, reranker) = _service(max_input_chars=100)
    resp = http.post("/v1/rerank", json=body)
    assert resp.status_code == status, resp.text
    assert says in resp.json()["error"]["message"] and "\n" not in resp.json()["error"]["message"]
    assert reranker.calls == []
    assert http.get("/healthz").status_code == 200


def test_without_a_reranker_the_first_stage_is_served_and_rerank_is_refused():
    http, (_, retriever, _) = _service(reranker=False)
    got = http.post("/v1/retrieve", json={"query": "q"}).json()["contexts"]
    assert [c["node_id"] for c in got] == ["n0", "n1"] and retriever.asked == [2]
    resp = http.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert resp.status_code == 404 and "serve.rerank.enabled" in resp.json()["error"]["message"]
    asked = http.post("/v1/rag", json={"query": "q", "rerank": True})
    assert asked.status_code == 400 and "no reranker" in asked.json()["error"]["message"]
    with pytest.raises(ValueError, match="rerank_candidates"):
        RAGService(None, None, None, IngressSettings(BASE, RAGPrompt("en", "s"), 1, 8, 8, rerank_candidates=5))
