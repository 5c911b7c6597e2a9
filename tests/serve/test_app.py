"""The RAG graph on a local Ray cluster with real vLLM, real SmolLM2 and real MiniLM (the
package's `served` graph: auth on, two embedder replicas)."""

import base64
import json
import time

import httpx
import numpy as np
import pytest

from tests.serve.conftest import DOCS, QUESTION, TOKEN_ENV

BASE = "SmolLM2-135M-Instruct"


@pytest.mark.slow
def test_openai_client_chat_models_and_embeddings(served):
    from openai import BadRequestError, NotFoundError

    client = served.openai()
    assert [m.id for m in client.models.list().data] == [BASE, "tuned", "tuned-merged"]

    msgs = [{"role": "user", "content": QUESTION}]
    base = client.chat.completions.create(model=BASE, messages=msgs, max_tokens=8)
    tuned = client.chat.completions.create(model="tuned", messages=msgs, max_tokens=8)
    assert "Paris" in base.choices[0].message.content
    assert base.usage.completion_tokens <= 8 and base.usage.prompt_tokens > 10
    assert tuned.choices[0].message.content != base.choices[0].message.content
    # The unmerged adapter served by vLLM answers as transformers + peft with the same adapter,
    # and so does the merged model on its own engine.
    assert tuned.choices[0].message.content.strip() == served.peft_answer.strip()
    merged = client.chat.completions.create(model="tuned-merged", messages=msgs, max_tokens=8)
    assert merged.model == "tuned-merged" and merged.choices[0].message.content.strip() == served.peft_answer.strip()

    emb = client.embeddings.create(input=["mountain", "river"], model="all-MiniLM-L6-v2")
    assert [len(d.embedding) for d in emb.data] == [384, 384]

    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        client.chat.completions.create(model="nope", messages=msgs, max_tokens=4)
    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(model="tuned", messages=[], max_tokens=4)


@pytest.mark.slow
def test_streamed_answer_equals_the_whole_greedy_answer(served):
    from openai import BadRequestError, NotFoundError

    client = served.openai()
    long_answer = [{"role": "user", "content": "Describe Paris in three sentences."}]
    msgs = [{"role": "user", "content": QUESTION}]
    for model, n, chat in ((BASE, 32, long_answer), ("tuned", 8, msgs)):
        whole = client.chat.completions.create(model=model, messages=chat, max_tokens=n)
        t0, arrived, chunks = time.perf_counter(), [], []
        for chunk in client.chat.completions.create(model=model, messages=chat, max_tokens=n, stream=True,
                                                    stream_options={"include_usage": True}):
            chunks.append(chunk)
            arrived.append(time.perf_counter() - t0)
        pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        assert "".join(pieces) == whole.choices[0].message.content
        assert len(pieces) >= whole.usage.completion_tokens // 2  # token by token, not one piece
        first = next(t for c, t in zip(chunks, arrived) if c.choices and c.choices[0].delta.content)
        assert first < arrived[-1] / 2  # sent as generated, not buffered until the end
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        assert finish == [whole.choices[0].finish_reason]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        if model == "tuned":
            assert "".join(pieces).strip() == served.peft_answer.strip()

    # Errors found before the first chunk are 4xx JSON, as without streaming.
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        client.chat.completions.create(model="nope", messages=msgs, max_tokens=4, stream=True)
    long_msgs = [{"role": "user", "content": "word " * 5000}]  # ~5000 tokens > max_model_len 4096
    with pytest.raises(BadRequestError, match=r"the prompt is \d+ tokens; with max_tokens=4 it exceeds"):
        client.chat.completions.create(model=BASE, messages=long_msgs, max_tokens=4, stream=True)
    with pytest.raises(BadRequestError, match="exceeds the model's context of 4096 tokens"):
        client.chat.completions.create(model=BASE, messages=long_msgs, max_tokens=4)


@pytest.mark.slow
def test_rag_endpoint_retrieves_then_answers_and_rejects_bad_requests(served):
    with httpx.Client(base_url=served.url, timeout=300, headers=served.headers) as http:
        out = http.post("/v1/rag", json={"query": "How tall is Mount Everest?", "max_tokens": 32,
                                         "rerank": False}).json()
        assert [c["node_id"] for c in out["contexts"]][0] == "everest" and len(out["contexts"]) == 2
        assert out["contexts"][0]["score"] > out["contexts"][1]["score"]
        assert out["model"] == BASE and "8,849" in out["answer"].replace(" ", "")
        assert out["completion_tokens"] <= 32 and out["generation_latency_s"] > 0

        gold = http.post("/v1/rag", json={"query": "Where does the Nile flow?", "model": "tuned",
                                          "contexts": [DOCS[1]["text"]]}).json()
        assert gold["contexts"] == [{"node_id": None, "text": DOCS[1]["text"], "score": None, "retrieval_score": None,
                                     "retrieval_rank": None, "rerank_score": None}]
        assert gold["model"] == "tuned"

        bad = [
            (http.post("/v1/rag", content=b"{not json", headers={"content-type": "application/json"}), 400),
            (http.post("/v1/chat/completions", content=b"{", headers={"content-type": "application/json"}), 400),
            (http.post("/v1/rag", json={"query": ""}), 400),
            (http.post("/v1/rag", json={"query": "q", "model": "missing"}), 404),
            (http.post("/v1/rag", json={"query": "q", "max_tokens": 100000}), 400),
            (http.post("/v1/rag", json={"query": "q", "contexts": []}), 400),
            (http.post("/v1/rag", json={"query": "q", "unknown": 1}), 400),
            (http.post("/v1/embeddings", json={"input": []}), 400),
            (http.post("/v1/embeddings", json={"input": ["x"] * 257}), 400),
        ]
        for resp, status in bad:
            assert resp.status_code == status, resp.text
            assert resp.json()["error"]["message"]
        # The error names the problem without Ray's traceback around it.
        missing = http.post("/v1/rag", json={"query": "q", "model": "missing"}).json()["error"]
        assert missing == {"message": f"unknown model 'missing'; served: {BASE}, tuned, tuned-merged",
                           "type": "model_not_found"}
        assert http.get("/healthz").json() == {"status": "ok"}  # still serving


@pytest.mark.slow
def test_structured_output_and_retrieve_endpoint(served):
    from openai import BadRequestError

    client = served.openai()
    schema = {"type": "object", "required": ["city", "sure"], "additionalProperties": False,
              "properties": {"city": {"type": "string"}, "sure": {"type": "boolean"}}}
    out = client.chat.completions.create(
        model=BASE, max_tokens=40,
        messages=[{"role": "user", "content": f"{QUESTION} Reply in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    reply = json.loads(out.choices[0].message.content)  # decoding was constrained to the schema
    assert set(reply) == {"city", "sure"} and isinstance(reply["sure"], bool)
    with pytest.raises(BadRequestError, match="json_schema"):
        client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format={"type": "json_schema"})
    # Sampling parameters reach vLLM: greedy text that would run on stops at the first space.
    free = client.chat.completions.create(model=BASE, max_tokens=16, messages=[{"role": "user", "content": QUESTION}])
    cut = client.chat.completions.create(model=BASE, max_tokens=16, stop=[" "],
                                         messages=[{"role": "user", "content": QUESTION}])
    assert " " in free.choices[0].message.content.strip()
    assert " " not in cut.choices[0].message.content and cut.choices[0].finish_reason == "stop"
    # A schema vLLM cannot compile (its own client error, not a ValueError) is a 400 too.
    with pytest.raises(BadRequestError, match="response_format"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       response_format={"type": "json_schema",
                                                        "json_schema": {"name": "a", "schema": {"type": "objekt"}}})

    with httpx.Client(base_url=served.url, timeout=300, headers=served.headers) as http:
        got = http.post("/v1/retrieve", json={"query": "Which river flows into the sea?", "top_k": 3,
                                              "rerank": False}).json()
        assert [c["node_id"] for c in got["contexts"]][0] == "nile" and len(got["contexts"]) == 3
        assert got["latency_s"] > 0
        assert http.post("/v1/retrieve", json={"query": ""}).status_code == 400

        floats = http.post("/v1/embeddings", json={"input": ["river", "mountain"]}).json()["data"]
        b64 = http.post("/v1/embeddings", json={"input": ["river", "mountain"],
                                               "encoding_format": "base64"}).json()["data"]
        for f, b in zip(floats, b64):
            np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), "<f4"),
                                          np.asarray(f["embedding"], dtype=np.float32))


@pytest.mark.slow
def test_bearer_token_is_required_and_never_logged(served, ray_cluster, monkeypatch):
    from openai import AuthenticationError, OpenAI

    wrong_token = "wrong-" + served.token[::-1]
    with httpx.Client(base_url=served.url, timeout=60) as http:
        body = {"query": "How tall is Mount Everest?", "contexts": [DOCS[0]["text"]], "max_tokens": 4}
        none = http.post("/v1/rag", json=body)
        wrong = http.post("/v1/rag", json=body, headers={"Authorization": f"Bearer {wrong_token}"})
        assert (none.status_code, wrong.status_code) == (401, 401)
        assert none.json()["error"]["type"] == wrong.json()["error"]["type"] == "authentication_error"
        assert http.get("/healthz").status_code == 200  # probes need no token
        assert http.post("/v1/rag", json=body, headers=served.headers).status_code == 200
    with pytest.raises(AuthenticationError, match="invalid bearer token"):
        OpenAI(base_url=f"{served.url}/v1", api_key=wrong_token).models.list()

    # The eval stage's client takes the token from the variable the job names.
    from ray_ft.errors import RayFTError
    from ray_ft.eval.clients import RAGClient

    with pytest.raises(RayFTError, match="401"):
        RAGClient(served.url).models()
    with pytest.raises(RayFTError, match=f"environment variable {TOKEN_ENV} .* is not set"):
        RAGClient(served.url, api_key_env=TOKEN_ENV)
    monkeypatch.setenv(TOKEN_ENV, served.token)
    client = RAGClient(served.url, api_key_env=TOKEN_ENV)
    assert client.models() == [BASE, "tuned", "tuned-merged"] and client.embed(["river"]).shape == (1, 384)
    assert client.chat_model(BASE).chat([{"role": "user", "content": QUESTION}], max_tokens=4)

    # Neither the token nor a wrong one appears in any log of the session (driver, controller,
    # proxy, every replica), which do hold the ingress's own lines.
    from pathlib import Path

    time.sleep(2)  # log lines are flushed asynchronously
    logs = Path(ray_cluster._private.worker._global_node.get_session_dir_path()) / "logs"
    text = "\n".join(p.read_text(errors="replace") for p in logs.rglob("*") if p.is_file())
    assert "RAGIngress" in text
    assert served.token not in text and wrong_token not in text


@pytest.mark.slow
def test_an_evaluation_never_takes_over_a_running_deployment(served):
    from ray_ft.errors import RayFTError
    from ray_ft.serve.app import deploy

    # `ray-ft eval`/`run` deploy with take_over=False: a live ray_ft app on the cluster stays.
    with pytest.raises(RayFTError, match="the Serve app 'servetest' is already running on this cluster"):
        deploy(served.cfg, "/no/model", "/no/embedder", {}, [], take_over=False)
    with httpx.Client(base_url=served.url, timeout=60, headers=served.headers) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        assert BASE in [m["id"] for m in http.get("/v1/models").json()["data"]]


@pytest.mark.slow
def test_rerank_endpoint_and_reranked_rag_on_the_real_graph(served):
    from ray_ft.reranker import CrossEncoderReranker

    query, docs = "How tall is Mount Everest?", [d["text"] for d in DOCS]
    expected = CrossEncoderReranker(served.reranker_dir).scores(query, docs)  # the same folder, in-process
    order = [int(i) for i in np.argsort(-expected, kind="stable")]
    with httpx.Client(base_url=served.url, timeout=300, headers=served.headers) as http:
        out = http.post("/v1/rerank", json={"query": query, "documents": docs}).json()
        assert [r["index"] for r in out["results"]] == order
        assert [r["relevance_score"] for r in out["results"]] == pytest.approx(expected[order], abs=1e-5)
        assert [r["document"]["text"] for r in out["results"]] == [docs[i] for i in order]
        top = http.post("/v1/rerank", json={"query": query, "documents": docs, "top_n": 1}).json()["results"]
        assert [r["index"] for r in top] == order[:1]

        # /v1/rag: the retriever's 3 candidates (serve.rerank.candidates), the reranker's best 2
        rag = http.post("/v1/rag", json={"query": query, "top_k": 2, "max_tokens": 4}).json()
        by_text = {d["text"]: d["passage_id"] for d in DOCS}
        assert [c["node_id"] for c in rag["contexts"]] == [by_text[docs[i]] for i in order[:2]]
        assert [c["rerank_score"] for c in rag["contexts"]] == pytest.approx(expected[order[:2]], abs=1e-5)
        plain = http.post("/v1/retrieve", json={"query": query, "top_k": 3, "rerank": False}).json()["contexts"]
        rank = {c["node_id"]: i for i, c in enumerate(plain)}  # the first stage's order and scores
        for c in rag["contexts"]:
            assert c["retrieval_rank"] == rank[c["node_id"]]
            assert c["retrieval_score"] == pytest.approx(plain[rank[c["node_id"]]]["score"], abs=1e-6)

        bad = [({"query": query, "documents": []}, 400), ({"query": query, "documents": ["d"] * 257}, 400),
               ({"query": query, "documents": [1]}, 400), ({"query": "", "documents": ["d"]}, 400),
               ({"query": query}, 400)]
        for body, status in bad:
            resp = http.post("/v1/rerank", json=body)
            assert resp.status_code == status and resp.json()["error"]["message"], resp.text
        assert http.get("/healthz").json() == {"status": "ok"}


@pytest.mark.slow
def test_a_second_job_serves_beside_the_first_under_its_own_route_prefix(served):
    from ray import serve

    from ray_ft.config import parse_job
    from ray_ft.errors import RayFTError
    from ray_ft.models import resolve_model
    from ray_ft.serve.app import deploy, stop_serving

    def job(**serve_cfg):
        return parse_job({"name": "second", "data": {"language": "en"}, "output_dir": served.cfg.output_dir,
                          "serve": {"http_port": served.cfg.serve.http_port, "max_tokens": 8, "top_k": 1,
                                    # the first graph holds 3.6 of the cluster's 4 CPUs
                                    "generator_cpus": 0.05, "embedder_cpus": 0.05,
                                    "knowledge_base": {"embed_cpus": 0.1},
                                    "vllm": {"dtype": "float32"}, **serve_cfg}})

    model, embedder = str(resolve_model(BASE)), str(resolve_model("all-MiniLM-L6-v2"))
    # The first job holds "/" and the port: a second job asking for either is refused up front.
    with pytest.raises(RayFTError, match="serve.route_prefix='/' is used by the Serve app 'servetest'"):
        deploy(job(), model, embedder, {}, DOCS[:1])
    other_port = served.cfg.serve.http_port + 1
    with pytest.raises(RayFTError, match=f"serve.http_port={other_port}, but Serve .* listens on "
                                         f"{served.cfg.serve.http_port}"):
        deploy(job(http_port=other_port, route_prefix="/second"), model, embedder, {}, DOCS[:1])
    assert set(serve.status().applications) == {"servetest"}

    second = job(route_prefix="/second")
    url = deploy(second, model, embedder, {}, DOCS[1:2])
    try:
        assert url == served.url + "/second"
        assert set(serve.status().applications) == {"servetest", "second"}
        with httpx.Client(base_url=url, timeout=120) as http:  # no auth on the second job
            assert http.get("/healthz").json() == {"status": "ok"}
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [BASE]
            hits = http.post("/v1/retrieve", json={"query": "Which river flows into the sea?", "top_k": 3}).json()
            assert [c["node_id"] for c in hits["contexts"]] == ["nile"]  # its own knowledge base only
            assert http.get("/openapi.json").json()["paths"].keys() >= {"/v1/chat/completions", "/v1/rag"}
        with httpx.Client(base_url=served.url, timeout=120, headers=served.headers) as http:
            assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [BASE, "tuned", "tuned-merged"]
            first = http.post("/v1/retrieve", json={"query": "How tall is Everest?", "top_k": 3}).json()
            assert {c["node_id"] for c in first["contexts"]} == {d["passage_id"] for d in DOCS}
    finally:
        stop_serving(second)  # the first job's app is left, so Serve stays up
    assert set(serve.status().applications) == {"servetest"}
    with httpx.Client(base_url=served.url, timeout=60, headers=served.headers) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
