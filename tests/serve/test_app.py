"""The RAG graph on a local Ray cluster with real vLLM, real SmolLM2 and real MiniLM."""

import httpx
import pytest

from ray_ft.config import parse_job
from ray_ft.testing import make_random_lora_adapter

DOCS = [
    {"passage_id": "everest", "text": "Mount Everest is the highest mountain on Earth, 8,849 metres tall."},
    {"passage_id": "nile", "text": "The Nile is a major river in Africa that flows into the Mediterranean Sea."},
    {"passage_id": "apple", "text": "Apple's total net sales were 383 billion dollars in fiscal 2023."},
]
QUESTION = "What is the capital of France?"


def _peft_greedy(peft_model, tok, question, n_tokens):
    import torch

    text = tok.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = peft_model.generate(**ids, max_new_tokens=n_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def served(ray_cluster, smollm_dir, minilm_dir, tmp_path_factory):
    from ray import serve
    from transformers import AutoTokenizer

    from ray_ft.serve.app import deploy

    adapter = tmp_path_factory.mktemp("adapter")
    peft_model = make_random_lora_adapter(smollm_dir, adapter, std=0.05)
    expected = _peft_greedy(peft_model, AutoTokenizer.from_pretrained(smollm_dir), QUESTION, 8)
    del peft_model
    cfg = parse_job({"name": "servetest", "data": {"language": "en"},
                     # fp32 like the transformers + peft reference, so greedy outputs can be compared
                     "serve": {"http_port": 8765, "top_k": 2, "max_tokens": 16,
                               "vllm": {"dtype": "float32"}}})
    url = deploy(cfg, str(smollm_dir), str(minilm_dir), {"tuned": str(adapter)}, DOCS)
    yield url, expected
    serve.shutdown()


@pytest.mark.slow
def test_openai_client_chat_models_and_embeddings(served):
    from openai import BadRequestError, NotFoundError, OpenAI

    url, peft_expected = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct", "tuned"]

    msgs = [{"role": "user", "content": QUESTION}]
    base = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=msgs, max_tokens=8)
    tuned = client.chat.completions.create(model="tuned", messages=msgs, max_tokens=8)
    assert "Paris" in base.choices[0].message.content
    assert base.usage.completion_tokens <= 8 and base.usage.prompt_tokens > 10
    assert tuned.choices[0].message.content != base.choices[0].message.content
    # The unmerged adapter served by vLLM answers as transformers + peft with the same adapter.
    assert tuned.choices[0].message.content.strip() == peft_expected.strip()

    emb = client.embeddings.create(input=["mountain", "river"], model="all-MiniLM-L6-v2")
    assert [len(d.embedding) for d in emb.data] == [384, 384]

    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        client.chat.completions.create(model="nope", messages=msgs, max_tokens=4)
    with pytest.raises(BadRequestError, match="messages"):
        client.chat.completions.create(model="tuned", messages=[], max_tokens=4)


@pytest.mark.slow
def test_rag_endpoint_retrieves_then_answers_and_rejects_bad_requests(served):
    url, _ = served
    with httpx.Client(base_url=url, timeout=300) as http:
        out = http.post("/v1/rag", json={"query": "How tall is Mount Everest?", "max_tokens": 32}).json()
        assert [c["node_id"] for c in out["contexts"]][0] == "everest" and len(out["contexts"]) == 2
        assert out["contexts"][0]["score"] > out["contexts"][1]["score"]
        assert out["model"] == "SmolLM2-135M-Instruct" and "8,849" in out["answer"].replace(" ", "")
        assert out["completion_tokens"] <= 32 and out["generation_latency_s"] > 0

        gold = http.post("/v1/rag", json={"query": "Where does the Nile flow?", "model": "tuned",
                                          "contexts": [DOCS[1]["text"]]}).json()
        assert gold["contexts"] == [{"node_id": None, "text": DOCS[1]["text"], "score": None}]
        assert gold["model"] == "tuned"

        bad = [
            (http.post("/v1/rag", content=b"{not json", headers={"content-type": "application/json"}), 400),
            (http.post("/v1/rag", json={"query": ""}), 400),
            (http.post("/v1/rag", json={"query": "q", "model": "missing"}), 404),
            (http.post("/v1/rag", json={"query": "q", "max_tokens": 100000}), 400),
            (http.post("/v1/rag", json={"query": "q", "contexts": []}), 400),
            (http.post("/v1/rag", json={"query": "q", "unknown": 1}), 400),
            (http.post("/v1/embeddings", json={"input": []}), 400),
        ]
        for resp, status in bad:
            assert resp.status_code == status, resp.text
            assert resp.json()["error"]["message"]
        assert http.get("/healthz").json() == {"status": "ok"}  # still serving


@pytest.mark.slow
def test_structured_output_and_retrieve_endpoint(served):
    import json

    from openai import BadRequestError, OpenAI

    url, _ = served
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    schema = {"type": "object", "required": ["city", "sure"], "additionalProperties": False,
              "properties": {"city": {"type": "string"}, "sure": {"type": "boolean"}}}
    out = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", max_tokens=40,
        messages=[{"role": "user", "content": f"{QUESTION} Reply in JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    reply = json.loads(out.choices[0].message.content)  # decoding was constrained to the schema
    assert set(reply) == {"city", "sure"} and isinstance(reply["sure"], bool)
    with pytest.raises(BadRequestError, match="json_schema"):
        client.chat.completions.create(model="tuned", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=4, response_format={"type": "json_schema"})

    with httpx.Client(base_url=url, timeout=300) as http:
        got = http.post("/v1/retrieve", json={"query": "Which river flows into the sea?", "top_k": 3}).json()
        assert [c["node_id"] for c in got["contexts"]][0] == "nile" and len(got["contexts"]) == 3
        assert got["latency_s"] > 0
        assert http.post("/v1/retrieve", json={"query": ""}).status_code == 400

        import base64

        import numpy as np

        floats = http.post("/v1/embeddings", json={"input": ["river", "mountain"]}).json()["data"]
        b64 = http.post("/v1/embeddings", json={"input": ["river", "mountain"],
                                               "encoding_format": "base64"}).json()["data"]
        for f, b in zip(floats, b64):
            np.testing.assert_array_equal(np.frombuffer(base64.b64decode(b["embedding"]), "<f4"),
                                          np.asarray(f["embedding"], dtype=np.float32))
