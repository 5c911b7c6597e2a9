"""The ingress (FastAPI app + RAGService) against fake deployments: wire format of streamed and
whole answers, errors, auth, limits, timeouts and retries. No Ray, no model: fast."""

import asyncio
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr
from ray.exceptions import ActorDiedError

from ray_ft.serve.engines import PromptTooLong, UnknownModelError
from ray_ft.serve.ingress import RETRIES_HEADER, IngressSettings, RAGService, build_api
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.serve.protocols import Completion, Hit
from tests.serve.fakes import FakeHandle

BASE = "base-model"
PIECES = ["Par", "is", " is", " the capital."]


class FakeGenerator:
    def __init__(self, delay_s: float = 0.0, fail_after: int | None = None, names=(BASE, "tuned")):
        self.delay_s, self.fail_after, self.names = delay_s, fail_after, list(names)
        self.seen: list[list[dict]] = []
        self.sampling: list[dict | None] = []

    def model_names(self):
        return self.names

    def _check(self, model, messages):
        if model not in self.model_names():
            raise UnknownModelError(f"unknown model '{model}'; served: {', '.join(self.names)}")
        if sum(len(m["content"]) for m in messages) > 500:
            raise PromptTooLong("the prompt is 900 tokens; with max_tokens=8 it exceeds the model's context")

    async def generate(self, messages, model, max_tokens, temperature, structured=None, sampling=None):
        self._check(model, messages)
        self.seen.append(messages)
        self.sampling.append({"max_tokens": max_tokens, **(sampling or {})})
        await asyncio.sleep(self.delay_s)
        return Completion("".join(PIECES), model, 12, len(PIECES), "stop")

    async def stream(self, messages, model, max_tokens, temperature, structured=None, sampling=None):
        self._check(model, messages)
        for i, piece in enumerate(PIECES):
            if self.fail_after is not None and i == self.fail_after:
                raise RuntimeError("engine core died")
            await asyncio.sleep(self.delay_s)
            yield Completion(piece, model, 12, i + 1, "length" if i == len(PIECES) - 1 else None)


class FlakyEmbedder:
    """Its replica "dies" on the first `deaths` calls (as Serve reports a killed replica)."""

    def __init__(self, deaths: int = 0):
        self.deaths, self.calls = deaths, 0

    async def embed(self, texts):
        self.calls += 1
        if self.calls <= self.deaths:
            raise ActorDiedError()
        return np.stack([np.full(4, len(t), dtype=np.float32) for t in texts])


class FakeRetriever:
    async def retrieve(self, query, top_k):
        return [Hit(f"n{i}", f"passage {i}", 1.0 - i / 10) for i in range(top_k)]


def _client(generator=None, embedder=None, engines=None, **overrides) -> TestClient:
    settings = IngressSettings(**{
        "base_name": BASE, "prompt": RAGPrompt("en", "sys"), "top_k": 2, "max_tokens": 8,
        "max_tokens_limit": 64, **overrides})
    service = RAGService(FakeHandle(generator or FakeGenerator()), FakeHandle(FakeRetriever()),
                         FakeHandle(embedder or FlakyEmbedder()), settings,
                         {name: FakeHandle(g) for name, g in (engines or {}).items()})
    return TestClient(build_api(service))


def test_whole_models_are_routed_to_their_own_engine():
    base, merged = FakeGenerator(), FakeGenerator(names=["merged"])
    http = _client(base, engines={"merged": merged}, model_names=(BASE, "tuned", "merged"))
    assert [m["id"] for m in http.get("/v1/models").json()["data"]] == [BASE, "tuned", "merged"]
    msgs = [{"role": "user", "content": "capital?"}]
    for model, engine in (("merged", merged), ("tuned", base), (BASE, base)):
        for body in ({"model": model, "messages": msgs}, {"model": model, "messages": msgs, "stream": True}):
            resp = http.post("/v1/chat/completions", json=body)
            assert resp.status_code == 200, resp.text
        rag = http.post("/v1/rag", json={"query": "capital?", "model": model})
        assert rag.status_code == 200 and rag.json()["model"] == model
    assert len(merged.seen) == 2 and len(base.seen) == 4  # streams record nothing in `seen`
    # A name no engine serves: 404 naming every served model, before any engine is asked.
    resp = http.post("/v1/chat/completions", json={"model": "nope", "messages": msgs})
    assert resp.status_code == 404 and resp.json()["error"]["message"] == \
        f"unknown model 'nope'; served: {BASE}, tuned, merged"
    assert (len(base.seen), len(merged.seen)) == (4, 2)


def _events(resp) -> list:
    lines = [ln for ln in resp.text.split("\n") if ln]
    assert all(ln.startswith("data: ") for ln in lines), lines
    return [ln.removeprefix("data: ") for ln in lines]


def test_streamed_chat_is_openai_chunks_then_done():
    http = _client()
    body = {"model": BASE, "messages": [{"role": "user", "content": "capital?"}], "stream": True,
            "stream_options": {"include_usage": True}}
    resp = http.post("/v1/chat/completions", json=body)
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
    events = _events(resp)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    content = [c["choices"][0]["delta"].get("content") for c in chunks[1:-2]]
    assert content == PIECES
    assert chunks[-2]["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 12, "completion_tokens": 4, "total_tokens": 16}


def test_openai_client_reads_the_stream_and_errors():
    from openai import APIError, NotFoundError, OpenAI

    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=_client())
    msgs = [{"role": "user", "content": "capital?"}]
    stream = client.chat.completions.create(model=BASE, messages=msgs, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(PIECES)
    assert chunks[-1].choices[0].finish_reason == "length"
    # An error before the first chunk is still a 4xx with a JSON body.
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        client.chat.completions.create(model="nope", messages=msgs, stream=True)
    # An error after the 200 was sent arrives as an error event, which the client raises.
    broken = OpenAI(base_url="http://testserver/v1", api_key="x",
                    http_client=_client(FakeGenerator(fail_after=2)))
    got = []
    with pytest.raises(APIError, match="engine core died"):
        for c in broken.chat.completions.create(model=BASE, messages=msgs, stream=True):
            got.append(c.choices[0].delta.content)
    assert got == ["", *PIECES[:2]]


def test_bad_requests_get_json_errors_that_say_what_is_wrong():
    http = _client(max_input_chars=100, max_request_bytes=2048)
    chat = "/v1/chat/completions"
    msg = [{"role": "user", "content": "hi"}]
    cases = [
        (http.post(chat, content=b"{not json", headers={"content-type": "application/json"}), 400, "JSON"),
        (http.post(chat, json={"model": BASE, "messages": []}), 400, "messages"),
        (http.post(chat, json={"model": BASE, "messages": msg, "max_tokens": 65}), 400, "exceeds the limit 64"),
        (http.post(chat, json={"model": "nope", "messages": msg}), 404, "unknown model 'nope'"),
        (http.post(chat, json={"model": BASE, "messages": [{"role": "user", "content": "x" * 101}]}),
         400, "messages: 101 characters exceed the limit of 100"),
        (http.post(chat, json={"model": BASE, "messages": [{"role": "user", "content": "x" * 4000}]}),
         413, "exceeds the limit of 2048"),
        (http.post("/v1/rag", json={"query": "q" * 60, "contexts": ["c" * 50]}), 400, "query and contexts"),
        (http.post("/v1/embeddings", json={"input": []}), 400, "1 to 256 texts"),
        (http.post("/v1/rag", json={"query": "q", "model": "nope"}), 404, "unknown model"),
        # Bodies FastAPI itself cannot parse, and routes it does not know: the same error shape.
        (http.post("/v1/embeddings", content=b'{"input": "\xff\xfe"}', headers={"content-type": "application/json"}),
         400, "error parsing the body"),
        (_client(max_request_bytes=1_000_000).post("/v1/embeddings", content=b"[" * 100_000 + b"]" * 100_000,
                                                   headers={"content-type": "application/json"}),
         400, "error parsing the body"),
        (http.get("/v1/nowhere"), 404, "Not Found"),
        (http.get(chat), 405, "Method Not Allowed"),
    ]
    for resp, status, text in cases:
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert text in err["message"] and err["type"], err
    # A chunked body (no Content-Length) is held to the same limit, and a small one still works.
    def chunks(n):
        yield b'{"input": "'
        yield b"x" * n
        yield b'"}'
    resp = http.post("/v1/embeddings", content=chunks(4000), headers={"content-type": "application/json"})
    assert resp.status_code == 413 and "exceeds the limit of 2048" in resp.json()["error"]["message"]
    resp = http.post("/v1/embeddings", content=chunks(10), headers={"content-type": "application/json"})
    assert resp.status_code == 200 and len(resp.json()["data"]) == 1
    huge = _client(max_input_chars=10_000)  # passes the char limit, too long for the engine
    resp = huge.post(chat, json={"model": BASE, "messages": [{"role": "user", "content": "x" * 600}],
                                 "stream": True})
    assert resp.status_code == 400 and "exceeds the model's context" in resp.json()["error"]["message"]
    assert http.get("/healthz").json() == {"status": "ok"}


def test_bearer_token_guards_everything_but_healthz():
    settings_token = SecretStr("s3cret-token")
    http = _client(auth_token=settings_token)
    body = {"input": ["a"]}
    assert http.post("/v1/embeddings", json=body).status_code == 401
    wrong = http.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"] == {
        "message": "invalid bearer token", "type": "authentication_error"}
    missing = http.get("/v1/models")
    assert missing.status_code == 401 and "missing bearer token" in missing.json()["error"]["message"]
    assert http.get("/healthz").status_code == 200
    ok = http.post("/v1/embeddings", json=body, headers={"Authorization": "Bearer s3cret-token"})
    assert ok.status_code == 200 and ok.json()["data"][0]["embedding"] == [1.0] * 4
    assert "s3cret" not in repr(IngressSettings(BASE, RAGPrompt("en", "s"), 1, 1, 2, auth_token=settings_token))


def test_timeout_answers_504_and_cancels_the_call():
    gen = FakeGenerator(delay_s=2.0)
    handle = FakeHandle(gen)
    settings = IngressSettings(BASE, RAGPrompt("en", "sys"), 2, 8, 64, request_timeout_s=0.2)
    http = TestClient(build_api(RAGService(handle, FakeHandle(FakeRetriever()), FakeHandle(FlakyEmbedder()),
                                           settings)))
    resp = http.post("/v1/chat/completions", json={"model": BASE, "messages": [{"role": "user", "content": "q"}]})
    assert resp.status_code == 504
    assert resp.json()["error"] == {"message": "generator did not answer within 0.2 s", "type": "timeout"}
    assert handle.sent[-1].cancelled
    # Streamed: the deadline covers the whole answer; past it the stream ends with an error event.
    gen.delay_s = 0.08
    resp = http.post("/v1/chat/completions", json={"model": BASE, "stream": True,
                                                   "messages": [{"role": "user", "content": "q"}]})
    events = _events(resp)
    assert json.loads(events[-1])["error"]["type"] == "timeout" and "[DONE]" not in events
    assert handle.sent[-1].cancelled


def test_a_dead_replica_is_retried_then_reported():
    emb = FlakyEmbedder(deaths=2)
    ok = _client(embedder=emb).post("/v1/embeddings", json={"input": ["ab", "c"]})
    assert ok.status_code == 200 and ok.headers[RETRIES_HEADER] == "2" and emb.calls == 3
    assert [d["embedding"][0] for d in ok.json()["data"]] == [2.0, 1.0]
    resp = _client(embedder=FlakyEmbedder(deaths=5), retries=1).post("/v1/embeddings", json={"input": "a"})
    assert resp.status_code == 503
    assert resp.json()["error"]["message"] == ("embedder unavailable: its replica died before answering, on 2 attempt(s) (ActorDiedError)")


def test_rag_uses_the_configured_prompt_and_top_k():
    gen = FakeGenerator()
    tmpl = "Passages:\n{context_str}\nQ: {query}\nA:"
    http = _client(generator=gen, prompt=RAGPrompt("en", "Answer briefly.", tmpl))
    out = http.post("/v1/rag", json={"query": "where?", "model": "tuned"}).json()
    assert [c["node_id"] for c in out["contexts"]] == ["n0", "n1"] and out["model"] == "tuned"
    assert gen.seen[-1] == [{"role": "system", "content": "Answer briefly."},
                            {"role": "user", "content": "Passages:\npassage 0\n\npassage 1\nQ: where?\nA:"}]


def test_openai_sampling_parameters_reach_the_engine_and_unsupported_ones_are_refused():
    from openai import BadRequestError, OpenAI

    gen = FakeGenerator()
    client = OpenAI(base_url="http://testserver/v1", api_key="x", http_client=_client(gen))
    parts = [{"type": "text", "text": "capital"}, {"type": "text", "text": "of France?"}]
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": parts}],
                                   max_completion_tokens=5, top_p=0.5, stop="\n", seed=7)
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}],
                                   max_tokens=3, stop=["a", "b"])
    client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hi"}])
    assert gen.sampling == [{"max_tokens": 5, "top_p": 0.5, "stop": ["\n"], "seed": 7},
                            {"max_tokens": 3, "stop": ["a", "b"]}, {"max_tokens": 8}]
    assert gen.seen[0][-1]["content"] == "capital\nof France?"
    msg = [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequestError, match=r"n: Input should be less than or equal to 1"):
        client.chat.completions.create(model=BASE, messages=msg, n=2)
    with pytest.raises(BadRequestError, match="at most 4 stop strings"):
        client.chat.completions.create(model=BASE, messages=msg, stop=list("abcde"))
    with pytest.raises(BadRequestError, match=r"only text content parts are served, got \['image_url'\]"):
        client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    with pytest.raises(BadRequestError, match="max_tokens=65 exceeds the limit 64"):
        client.chat.completions.create(model=BASE, messages=msg, max_completion_tokens=65)
