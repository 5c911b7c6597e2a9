"""schemathesis against the real graph (real vLLM CPU, real MiniLM, the LanceDB knowledge base,
auth on) over HTTP on 127.0.0.1: requests generated from the served `/openapi.json`, valid ones
and ones broken on purpose, each answered within the request deadline by a 2xx or a documented
4xx in the error shape, never a 5xx; the app and every replica alive afterwards. Bounded here;
`bench/api_fuzz.py` runs more examples."""

from __future__ import annotations

import httpx
import pytest

# Document writes would change the knowledge base the other tests of the package read; they
# are fuzzed against the ingress in tests/serve/test_openapi.py.
SKIPPED = {("POST", "/v1/documents"), ("DELETE", "/v1/documents/{document_id}")}
OPERATIONS = {("GET", "/healthz"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
              ("POST", "/v1/embeddings"), ("POST", "/v1/retrieve"), ("POST", "/v1/rerank"),
              ("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/{name}"), ("POST", "/v1/rag")}
EXAMPLES = 8  # per operation and mode: ~2 minutes on 2 cores


@pytest.mark.slow
def test_generated_requests_against_the_real_graph(served):
    import schemathesis
    from ray import serve

    from ray_ft.testing import fuzz_api

    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", headers=served.headers)
    # An answer later than the ingress's own deadline (plus a margin) is a hang.
    tried, _ = fuzz_api(schema, served.headers, EXAMPLES, served.cfg.serve.request_timeout_s + 30, SKIPPED)
    assert {k.rsplit(" ", 1)[0] for k in tried} == {f"{m} {p}" for m, p in OPERATIONS}, tried
    assert sum(tried.values()) >= EXAMPLES * (2 * len(OPERATIONS) - 3)  # GET /healthz: nothing to vary
    app = serve.status().applications[served.cfg.name]
    assert app.status == "RUNNING" and {d.status for d in app.deployments.values()} == {"HEALTHY"}
    with httpx.Client(base_url=served.url, timeout=60, headers=served.headers) as http:
        assert http.get("/healthz").json() == {"status": "ok"}
        msgs = [{"role": "user", "content": "What is the capital of France?"}]
        out = http.post("/v1/chat/completions", json={"model": "SmolLM2-135M-Instruct", "messages": msgs,
                                                      "max_tokens": 8}).json()
        assert "Paris" in out["choices"][0]["message"]["content"]
