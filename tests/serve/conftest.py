"""One RAG graph for all of tests/serve (package scope: a vLLM deployment costs ~30 s): real
vLLM + SmolLM2 with a random LoRA adapter "tuned", the same adapter merged into a whole model
"tuned-merged" on a second vLLM engine, real MiniLM on two embedder replicas (the
failure test kills one), live adapters on, an autoscaling retriever (1-2 replicas) over the LanceDB knowledge base, a MiniLM cross-encoder with a
seeded fresh head as reranker (its order is not meaningful: tests of the first stage's order send
`rerank: false`), bearer-token auth on, on a free port."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import pytest

from ray_ft.config import JobConfig, parse_job
from ray_ft.testing import make_random_lora_adapter

DOCS = [
    {"passage_id": "everest", "text": "Mount Everest is the highest mountain on Earth, 8,849 metres tall."},
    {"passage_id": "nile", "text": "The Nile is a major river in Africa that flows into the Mediterranean Sea."},
    {"passage_id": "apple", "text": "Apple's total net sales were 383 billion dollars in fiscal 2023."},
]
QUESTION = "What is the capital of France?"
TOKEN_ENV = "RAY_FT_TEST_SERVE_TOKEN"
TOKEN = "tok-" + os.urandom(8).hex()  # fresh per session: a hit in the logs can only be a leak


@dataclass(frozen=True)
class Served:
    url: str
    token: str
    peft_answer: str  # transformers + peft greedy answer of "tuned" to QUESTION (8 tokens)
    cfg: JobConfig
    reranker_dir: str
    live_root: str  # where adapters may be registered from (serve.live_adapters.allowed_roots)

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.token}"}

    def openai(self):
        from openai import OpenAI

        return OpenAI(base_url=f"{self.url}/v1", api_key=self.token)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _peft_greedy(peft_model, tok, question, n_tokens):
    import torch

    text = tok.apply_chat_template(
        [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = peft_model.generate(**ids, max_new_tokens=n_tokens, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="package")
def served(ray_cluster, smollm_dir, minilm_dir, tmp_path_factory):
    from ray import serve
    from transformers import AutoTokenizer

    from ray_ft.reranker import load_cross_encoder
    from ray_ft.serve.app import deploy

    adapter, merged = tmp_path_factory.mktemp("adapter"), tmp_path_factory.mktemp("merged")
    reranker = tmp_path_factory.mktemp("reranker")
    live_root = tmp_path_factory.mktemp("live_adapters")
    for part in load_cross_encoder(str(minilm_dir), seed=0):
        part.save_pretrained(reranker)
    peft_model = make_random_lora_adapter(smollm_dir, adapter, std=0.05)
    tok = AutoTokenizer.from_pretrained(smollm_dir)
    expected = _peft_greedy(peft_model, tok, QUESTION, 8)
    # The same adapter merged into the base: a whole model, served on an engine of its own.
    peft_model.merge_and_unload().save_pretrained(merged)
    tok.save_pretrained(merged)
    del peft_model
    cfg = parse_job({"name": "servetest", "data": {"language": "en"},
                     "output_dir": str(tmp_path_factory.mktemp("runs")),
                     # fp32 like the transformers + peft reference, so greedy outputs can be compared
                     # max_tokens_limit bounds what the API fuzz test may ask for (test_api_fuzz.py)
                     "serve": {"http_port": free_port(), "top_k": 2, "max_tokens": 16, "max_tokens_limit": 48,
                               "models": {"tuned-merged": str(merged)},
                               "auth_token_env": TOKEN_ENV,
                               "rerank": {"enabled": True, "model": str(reranker), "candidates": 3, "cpus": 0.3},
                               # the shared LanceDB table, built by Ray Data on deploy; both
                               # retriever replicas open it
                               "knowledge_base": {"refresh_s": 0},
                               "live_adapters": {"enabled": True, "allowed_roots": [str(live_root)]},
                               "deployments": {
                                   "embedder": {"num_replicas": 2},
                                   # reacts within seconds, so a test can watch it scale up
                                   "retriever": {"autoscaling": {
                                       "min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1,
                                       "upscale_delay_s": 0.5, "downscale_delay_s": 1, "look_back_period_s": 2}}},
                               "vllm": {"dtype": "float32"}}})
    os.environ[TOKEN_ENV] = TOKEN  # read where the graph is built (here, the driver)
    try:
        url = deploy(cfg, str(smollm_dir), str(minilm_dir), {"tuned": str(adapter)}, DOCS,
                     {"tuned-merged": str(merged)}, reranker_dir=str(reranker))
    finally:
        del os.environ[TOKEN_ENV]
    yield Served(url, TOKEN, expected, cfg, str(reranker), str(live_root))
    serve.shutdown()
