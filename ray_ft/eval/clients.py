"""HTTP clients of the served graph and of any OpenAI-compatible endpoint.

`RAGClient` talks to ray_ft's own ingress (`/v1/rag`, `/v1/retrieve`, `/v1/embeddings`);
`OpenAIChat` to `/chat/completions` of any OpenAI-compatible server (ours, vLLM's, OpenAI's), so
an external model can be compared with the same prompts and judged through the same code.
Both raise RayFTError carrying the server's message on 4xx/5xx (RequestRejected when the request's
content is what the server refused).
"""

from __future__ import annotations

import base64
import os
from typing import Protocol

import httpx
import numpy as np

from ray_ft.errors import RayFTError


class RequestRejected(RayFTError):
    """The server refused this one request for what it holds (400, 413, 422: e.g. a prompt longer
    than the model's context); other requests may still succeed."""


REJECTED_STATUSES = (400, 413, 422)


def _post(http: httpx.Client, path: str, body: dict) -> dict:
    resp = http.post(path, json=body)
    if resp.status_code >= 400:
        error = RequestRejected if resp.status_code in REJECTED_STATUSES else RayFTError
        raise error(f"POST {http.base_url}{path.lstrip('/')} -> {resp.status_code}: {resp.text[:300]}")
    return resp.json()


class ChatModel(Protocol):
    """What the judge and external targets need: one chat completion, text out."""

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0,
             json_schema: dict | None = None) -> str: ...


class OpenAIChat:
    """`POST {base_url}/chat/completions` with `model`; `base_url` ends in /v1 as in the openai SDK.

    The API key comes from the environment variable named `api_key_env` (never from the job
    file, never logged). `json_schema` asks for structured output (`response_format`), which
    vLLM and OpenAI enforce while decoding; callers still validate what comes back.
    """

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None,
                 timeout_s: float = 600.0):
        self.model = model
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=timeout_s,
                                 headers=_bearer(api_key_env, base_url))

    def chat(self, messages: list[dict], max_tokens: int, temperature: float = 0.0,
             json_schema: dict | None = None) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                "temperature": temperature}
        if json_schema is not None:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": json_schema,
                                                       "strict": True}}
        out = _post(self.http, "chat/completions", body)
        return out["choices"][0]["message"]["content"] or ""


def _bearer(api_key_env: str | None, base_url: str) -> dict:
    if not api_key_env:
        return {}
    key = os.environ.get(api_key_env)
    if not key:
        raise RayFTError(f"environment variable {api_key_env} (API key for {base_url}) is not set")
    return {"Authorization": f"Bearer {key}"}


class RAGClient:
    """Client of the ray_ft ingress; `api_key_env` names the variable holding its bearer token
    (`serve.auth_token_env`) when the graph requires one."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, api_key_env: str | None = None):
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                 headers=_bearer(api_key_env, self.base_url))

    def rag(self, query: str, model: str, contexts: list[str] | None = None, **kw) -> dict:
        body = {"query": query, "model": model, **kw}
        if contexts is not None:
            body["contexts"] = contexts
        return _post(self.http, "/v1/rag", body)

    def retrieve(self, query: str, top_k: int | None = None, rerank: bool | None = None) -> dict:
        return _post(self.http, "/v1/retrieve", {"query": query, "top_k": top_k, "rerank": rerank})

    def embed(self, texts: list[str]) -> np.ndarray:
        # base64 float32: exact, and far cheaper to encode and parse than JSON floats.
        data = _post(self.http, "/v1/embeddings", {"input": list(texts), "encoding_format": "base64"})["data"]
        return np.stack([np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4")
                         for d in sorted(data, key=lambda d: d["index"])])

    def models(self) -> list[str]:
        resp = self.http.get("/v1/models")
        if resp.status_code >= 400:
            raise RayFTError(f"GET {self.base_url}/v1/models -> {resp.status_code}: {resp.text[:300]}")
        return [m["id"] for m in resp.json()["data"]]

    def chat_model(self, model: str) -> OpenAIChat:
        """The ingress's own OpenAI-compatible chat endpoint for `model`."""
        return OpenAIChat(self.base_url + "/v1", model, self.api_key_env)
