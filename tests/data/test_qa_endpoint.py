"""The endpoint writer against a stub OpenAI-compatible server on 127.0.0.1: retries after a 5xx,
Retry-After, errors that stop the job, the token-bucket rate limit, and the whole two-step
generation through Ray Data."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from ray_ft.config import QAGenerationConfig
from ray_ft.data.qa_endpoint import ChatEndpoint, TokenBucket
from ray_ft.data.qa_generation import generate_qa
from ray_ft.data.qa_writers import EndpointWriter
from ray_ft.errors import RayFTError

NODES = [{"node_id": f"n{i}", "text": f"Pier {i} opens at {6 + i} o'clock for the morning ferry.",
          "metadata": {"document": "piers.txt"}} for i in range(5)]


class Stub:
    """Fixed replies; `fail` lists the statuses to answer before the next success."""

    def __init__(self):
        self.fail: list[tuple[int, dict]] = []
        self.seen: list[tuple[float, dict, dict]] = []  # (time, headers, body)
        self.lock = threading.Lock()

    def reply(self, body: dict) -> tuple[int, dict, str]:
        with self.lock:
            if self.fail:
                status, headers = self.fail.pop(0)
                return status, headers, json.dumps({"error": {"message": "busy"}})
        prompt = body["messages"][-1]["content"]
        pier = next(i for i in range(5) if f"Pier {i} " in prompt)
        if "Question:" in prompt:
            content = json.dumps({"answer": f"at {6 + pier} o'clock"})
        else:
            content = json.dumps({"questions": [f"When does pier {pier} open?", f"Does pier {pier} open at {6 + pier} o'clock?"]})
        return 200, {}, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]})


@pytest.fixture
def stub():
    state = Stub()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.seen.append((time.monotonic(), dict(self.headers), body))
            status, headers, text = state.reply(body) if self.path == "/v1/chat/completions" else (404, {}, "{}")
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text.encode())

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    yield state
    server.shutdown()


def _ask(client, text="Pier 1 opens. Question: when?"):
    return client.chat([{"role": "user", "content": text}], 16, 0.0, {"type": "object"})


def test_a_5xx_is_retried_and_the_schema_and_key_are_sent(stub, monkeypatch):
    monkeypatch.setenv("STUB_KEY", "sk-test")
    client = ChatEndpoint(stub.url, "writer", "STUB_KEY", backoff_s=0.01)
    stub.fail = [(503, {}), (502, {})]
    assert json.loads(_ask(client)) == {"answer": "at 7 o'clock"}
    assert client.stats == {"requests": 3, "retries": 2}
    _, headers, body = stub.seen[-1]
    assert headers["Authorization"] == "Bearer sk-test" and body["model"] == "writer"
    assert body["response_format"]["json_schema"]["schema"] == {"type": "object"}


def test_retry_after_is_honoured_and_giving_up_names_the_problem(stub):
    client = ChatEndpoint(stub.url, "writer", max_retries=2, backoff_s=0.01)
    stub.fail = [(429, {"Retry-After": "0.4"})]
    t = time.monotonic()
    _ask(client)
    assert time.monotonic() - t >= 0.4
    stub.fail = [(500, {})] * 3
    with pytest.raises(RayFTError, match=r"chat/completions: HTTP 500 on 3 attempt\(s\)$"):
        _ask(client)


def test_a_client_error_stops_at_once_and_a_missing_key_is_named(stub, monkeypatch):
    client = ChatEndpoint(stub.url, "writer", backoff_s=0.01)
    stub.fail = [(400, {})]
    n = len(stub.seen)
    with pytest.raises(RayFTError, match=r"-> 400: .*busy"):
        _ask(client)
    assert len(stub.seen) == n + 1  # not re-sent
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    with pytest.raises(RayFTError, match="environment variable NO_SUCH_KEY"):
        ChatEndpoint(stub.url, "writer", "NO_SUCH_KEY")


def test_token_bucket_spaces_requests_after_the_burst():
    now = [0.0]
    slept = []

    def sleep(s):
        slept.append(round(s, 6))
        now[0] += s

    bucket = TokenBucket(rate=4.0, burst=2, clock=lambda: now[0], sleep=sleep)
    times = []
    for _ in range(5):
        bucket.take()
        times.append(round(now[0], 6))
    assert times == [0.0, 0.0, 0.25, 0.5, 0.75]  # two at once, then one every 1/rate seconds


def test_generation_through_ray_data_against_the_stub(stub, ray_cluster):
    gen = QAGenerationConfig(batch_size=4, endpoint={"base_url": stub.url, "model": "writer", "concurrency": 4,
                                                     "requests_per_second": 8.0, "burst": 1})
    stub.fail = [(503, {})]
    t = time.monotonic()
    rows, counts = generate_qa(NODES, EndpointWriter(), gen, "en")
    assert [(r["node_id"], r["question"], r["answer"]) for r in rows] == [
        (f"n{i}", f"When does pier {i} open?", f"at {6 + i} o'clock") for i in range(5)]
    assert counts.question_contains_answer == 5  # "Does pier 1 open at 7 o'clock?"
    assert counts.retries == 1 and len(stub.seen) == 5 + 1 + 10
    # the rate limit (one bucket in the one actor): 10 answer requests at 8/s with a burst of 1
    # are spread over at least 9/8 s, though 4 could be in flight at once
    sent = sorted(s for s, _, _ in stub.seen[-10:])
    assert sent[-1] - sent[0] >= 9 / 8 - 0.05
    assert time.monotonic() - t >= (5 + 9) / 8


def test_an_endpoint_that_keeps_failing_is_counted_not_fatal(stub, ray_cluster):
    gen = QAGenerationConfig(endpoint={"base_url": stub.url, "model": "writer", "max_retries": 1,
                                                     "concurrency": 1})
    stub.fail = [(503, {})] * 2  # node 0's question request fails twice, then the stub recovers
    rows, counts = generate_qa(NODES[:2], EndpointWriter(), gen, "en")
    assert counts.question_requests_failed == 1 and "HTTP 503 on 2 attempt(s)" in counts.examples["question_requests_failed"]
    assert {r["node_id"] for r in rows} == {"n1"}
