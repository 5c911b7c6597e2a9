"""Calling an OpenAI-compatible chat endpoint at a steady, bounded rate.

`TokenBucket` admits `rate` requests per second with bursts of `burst`; `ChatEndpoint` sends one
chat completion and re-sends it after a 429, a 5xx or a broken connection (exponential backoff, a
`Retry-After` header honoured); `EndpointCaller` is the Ray Data actor that keeps `concurrency`
requests of each batch in flight through one bucket.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from ray_ft.errors import RayFTError

log = logging.getLogger(__name__)

RETRIED_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `take()` blocks until one is free."""

    def __init__(self, rate: float | None, burst: int = 1, clock=time.monotonic, sleep=time.sleep):
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.clock, self.sleep = clock, sleep
        self.last = clock()
        self.lock = threading.Lock()

    def take(self) -> None:
        if self.rate is None:
            return
        while True:
            with self.lock:
                now = self.clock()
                self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                wait = (1 - self.tokens) / self.rate
            self.sleep(wait)


class ChatEndpoint:
    """`POST {base_url}/chat/completions`; the key comes from the variable `api_key_env` names."""

    def __init__(self, base_url: str, model: str, api_key_env: str | None = None, timeout_s: float = 120.0,
                 max_retries: int = 4, bucket: TokenBucket | None = None, structured_output: bool = True,
                 backoff_s: float = 0.5):
        headers = {}
        if api_key_env:
            key = os.environ.get(api_key_env)
            if not key:
                raise RayFTError(f"environment variable {api_key_env} (API key for {base_url}) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.http = httpx.Client(base_url=base_url.rstrip("/") + "/", timeout=timeout_s, headers=headers)
        self.model, self.max_retries, self.backoff_s = model, max_retries, backoff_s
        self.bucket = bucket or TokenBucket(None)
        self.structured_output = structured_output
        self.stats = {"requests": 0, "retries": 0}
        self.lock = threading.Lock()

    def chat(self, messages: list[dict], max_tokens: int, temperature: float, schema: dict | None) -> str:
        body = {"model": self.model, "messages": messages, "max_tokens": max_tokens, "temperature": temperature}
        if schema is not None and self.structured_output:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "reply", "schema": schema, "strict": True}}
        for attempt in range(self.max_retries + 1):
            self.bucket.take()
            with self.lock:
                self.stats["requests"] += 1
            try:
                resp = self.http.post("chat/completions", json=body)
            except httpx.TransportError as err:  # refused, reset, timed out: nothing was answered
                problem, wait = f"{type(err).__name__}", None
            else:
                if resp.status_code < 400:
                    return resp.json()["choices"][0]["message"]["content"] or ""
                if resp.status_code not in RETRIED_STATUSES:
                    raise RayFTError(f"POST {self.http.base_url}chat/completions -> {resp.status_code}: "
                                     f"{resp.text[:300]}")
                problem, wait = f"HTTP {resp.status_code}", _retry_after(resp)
            if attempt == self.max_retries:
                raise RayFTError(f"POST {self.http.base_url}chat/completions: {problem} on "
                                 f"{self.max_retries + 1} attempt(s)")
            with self.lock:
                self.stats["retries"] += 1
            time.sleep(wait if wait is not None else self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")


def _retry_after(resp: httpx.Response) -> float | None:
    try:
        return min(float(resp.headers["retry-after"]), 60.0)
    except (KeyError, ValueError):
        return None


class EndpointCaller:
    """The endpoint as a `Complete` engine: a list of requests goes out `concurrency` at a time; a
    request that still fails after its retries comes back with an empty reply and the reason in
    `error`, except a 4xx other than 429 (a wrong model name, a refused schema), which stops the
    job. `retries` on each reply is this caller's count so far."""

    def __init__(self, endpoint: dict, temperature: float):
        bucket = TokenBucket(endpoint["requests_per_second"], endpoint["burst"])
        self.client = ChatEndpoint(endpoint["base_url"], endpoint["model"], endpoint["api_key_env"],
                                   endpoint["timeout_s"], endpoint["max_retries"], bucket,
                                   endpoint["structured_output"])
        self.pool = ThreadPoolExecutor(endpoint["concurrency"])
        self.temperature = temperature

    def _one(self, request: dict) -> dict:
        try:
            reply, error = self.client.chat(request["messages"], request["max_tokens"], self.temperature,
                                            request["schema"]), ""
        except RayFTError as err:
            if "attempt(s)" not in str(err):
                raise
            reply, error = "", str(err)
        return {"reply": reply, "error": error, "generated_tokens": 0}

    def __call__(self, requests: list[dict]) -> list[dict]:
        done = list(self.pool.map(self._one, requests))
        for d in done:
            d["retries"] = self.client.stats["retries"]
        return done
