"""The HTTP face of the RAG graph: a FastAPI app over the generator, retriever and embedder.

Endpoints: `POST /v1/chat/completions` (OpenAI format; `stream: true` answers with server-sent
events; `response_format` JSON / JSON-schema output), `POST /v1/embeddings`, `GET /v1/models`,
`POST /v1/rag`, `POST /v1/retrieve`, `GET /healthz`.

`RAGService` holds what the endpoints do (validation, prompt, calls with retries and one deadline
per request) and `build_api` wraps it in FastAPI, so both can be tested with fake deployment
handles, without Ray. Bad requests get a 4xx JSON error `{"error": {"message", "type"}}` that
says what is wrong, and the service keeps serving. A response whose call had to be re-sent
because a replica died carries `x-ray-ft-retries`.
"""

from __future__ import annotations

import base64
import hmac
import time
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr

from ray_ft.errors import RayFTError
from ray_ft.serve.engines import InvalidMessages, InvalidStructuredOutput, PromptTooLong, UnknownModelError
from ray_ft.serve.openai_format import SSE_DONE, ChunkWriter, completion_body, error_body, sse
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.serve.resilience import (
    Deadline, UpstreamTimeout, UpstreamUnavailable, call_with_retries, next_item,
    open_stream_with_retries,
)
from ray_ft.serve.schemas import (
    ChatCompletionRequest, EmbeddingRequest, RAGRequest, RAGResponse, RetrievedContext,
    RetrieveRequest, RetrieveResponse,
)

RETRIES_HEADER = "x-ray-ft-retries"
OPEN_PATHS = {"/healthz"}  # no auth, no size check: load balancers and probes call it


@dataclass(frozen=True)
class IngressSettings:
    base_name: str
    prompt: RAGPrompt
    top_k: int
    max_tokens: int
    max_tokens_limit: int
    request_timeout_s: float = 300.0
    retries: int = 2
    max_input_chars: int = 100_000
    max_embed_inputs: int = 256
    max_request_bytes: int = 4_000_000
    auth_token: SecretStr | None = None  # SecretStr: repr and str show asterisks, never the token
    # Every served name (base, adapters, whole models), so an unknown one is a 404 before any
    # engine is called; empty: the generator decides.
    model_names: tuple[str, ...] = ()


class RequestError(RayFTError):
    """A request the service refuses, with the HTTP status and OpenAI error type to answer with."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


def cause_message(exc: BaseException) -> str:
    """The message of an error raised in another deployment, without Ray's traceback around it."""
    return str(getattr(exc, "cause", None) or exc)


class RAGService:
    """The endpoints' work, apart from HTTP."""

    def __init__(self, generator: Any, retriever: Any, embedder: Any, settings: IngressSettings,
                 engines: dict[str, Any] | None = None):
        """`generator` serves the base model and its adapters; `engines` the whole models that
        run on engines of their own (merged or fully fine-tuned), by served name."""
        self.generator, self.retriever, self.embedder = generator, retriever, embedder
        self.engines = engines or {}
        self.s = settings

    def _engine(self, model: str) -> Any:
        if model in self.engines:
            return self.engines[model]
        if self.s.model_names and model not in self.s.model_names:
            raise RequestError(404, f"unknown model '{model}'; served: {', '.join(self.s.model_names)}",
                               "model_not_found")
        return self.generator

    # -- checks ---------------------------------------------------------------------------------
    def _max_tokens(self, requested: int | None) -> int:
        n = requested or self.s.max_tokens
        if n > self.s.max_tokens_limit:
            raise RequestError(400, f"max_tokens={n} exceeds the limit {self.s.max_tokens_limit}")
        return n

    def _check_chars(self, n: int, what: str) -> None:
        if n > self.s.max_input_chars:
            raise RequestError(400, f"{what}: {n} characters exceed the limit of {self.s.max_input_chars}")

    async def _call(self, send, what: str, deadline: Deadline, stats: dict):
        return await call_with_retries(send, what, deadline, self.s.retries, stats=stats)

    # -- endpoints ------------------------------------------------------------------------------
    async def models(self) -> dict:
        names = await self._call(lambda: self.generator.model_names.remote(), "generator",
                                 Deadline(self.s.request_timeout_s), {})
        names = [*names, *self.engines]
        return {"object": "list",
                "data": [{"id": n, "object": "model", "owned_by": "ray_ft"} for n in names]}

    def _chat_args(self, req: ChatCompletionRequest) -> tuple:
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens)
        self._check_chars(sum(len(m.content) for m in req.messages), "messages")
        structured = req.response_format.structured() if req.response_format else None
        return ([m.model_dump() for m in req.messages], req.model, max_tokens, req.temperature, structured,
                req.sampling())

    async def chat(self, req: ChatCompletionRequest, stats: dict) -> dict:
        args, engine = self._chat_args(req), self._engine(req.model)
        out = await self._call(lambda: engine.generate.remote(*args), "generator",
                               Deadline(self.s.request_timeout_s), stats)
        return completion_body(out)

    async def chat_stream(self, req: ChatCompletionRequest, stats: dict):
        """Start the stream and wait for its first piece, so that a bad request (unknown model,
        oversize prompt, bad schema) still raises here and gets a 4xx JSON answer; return the
        server-sent events of the whole answer."""
        args = self._chat_args(req)
        deadline = Deadline(self.s.request_timeout_s)
        streaming = self._engine(req.model).options(stream=True)
        first, stream = await open_stream_with_retries(
            lambda: streaming.stream.remote(*args), "generator", deadline, self.s.retries, stats)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return self._events(first, stream, deadline, include_usage)

    async def _events(self, first, stream, deadline: Deadline, include_usage: bool):
        writer, item, finished = ChunkWriter(first.model), first, False
        try:
            yield writer.event({"role": "assistant", "content": ""})
            while True:
                if item.text:
                    yield writer.event({"content": item.text})
                last = item
                try:
                    item = await next_item(stream, "generator", deadline)
                except StopAsyncIteration:
                    break
            finished = True
            yield writer.event({}, last.finish_reason or "stop")
            if include_usage:
                yield writer.usage_event(last)
            yield SSE_DONE
        except Exception as err:  # noqa: BLE001 - the status is sent; the client must hear why
            # The 200 and earlier chunks are gone; an error event is what OpenAI clients raise on.
            kind = "timeout" if isinstance(err, UpstreamTimeout) else "server_error"
            yield sse(error_body(cause_message(err), kind))
        finally:
            if not finished:  # client gone, deadline or error: stop the engine working on it
                stream.cancel()

    async def embeddings(self, req: EmbeddingRequest, stats: dict) -> dict:
        texts = [req.input] if isinstance(req.input, str) else req.input
        if not texts or len(texts) > self.s.max_embed_inputs:
            raise RequestError(400, f"input must hold 1 to {self.s.max_embed_inputs} texts, got {len(texts)}")
        self._check_chars(sum(len(t) for t in texts), "input")
        vecs = await self._call(lambda: self.embedder.embed.remote(texts), "embedder",
                                Deadline(self.s.request_timeout_s), stats)
        if req.encoding_format == "base64":
            encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs]
        else:
            encoded = [v.tolist() for v in vecs]
        return {"object": "list", "model": req.model or "embedder",
                "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(encoded)],
                "usage": {"prompt_tokens": 0, "total_tokens": 0}}

    async def _retrieve(self, query: str, top_k: int | None, deadline: Deadline,
                        stats: dict) -> list[RetrievedContext]:
        hits = await self._call(lambda: self.retriever.retrieve.remote(query, top_k or self.s.top_k),
                                "retriever", deadline, stats)
        return [RetrievedContext(node_id=h.node_id, text=h.text, score=h.score) for h in hits]

    async def retrieve(self, req: RetrieveRequest, stats: dict) -> RetrieveResponse:
        self._check_chars(len(req.query), "query")
        t0 = time.perf_counter()
        contexts = await self._retrieve(req.query, req.top_k, Deadline(self.s.request_timeout_s), stats)
        return RetrieveResponse(contexts=contexts, latency_s=time.perf_counter() - t0)

    async def rag(self, req: RAGRequest, stats: dict) -> RAGResponse:
        max_tokens = self._max_tokens(req.max_tokens)
        self._check_chars(len(req.query) + sum(len(c) for c in req.contexts or ()), "query and contexts")
        deadline = Deadline(self.s.request_timeout_s)  # one budget for retrieval and generation
        t0 = time.perf_counter()
        if req.contexts is not None:
            if not req.contexts:
                raise RequestError(400, "contexts: give at least one passage or leave it out")
            contexts = [RetrievedContext(node_id=None, text=c, score=None) for c in req.contexts]
        else:
            contexts = await self._retrieve(req.query, req.top_k, deadline, stats)
        t1 = time.perf_counter()
        messages = self.s.prompt.messages([c.text for c in contexts], req.query)
        model = req.model or self.s.base_name
        engine = self._engine(model)
        out = await self._call(
            lambda: engine.generate.remote(messages, model, max_tokens, req.temperature),
            "generator", deadline, stats)
        return RAGResponse(
            answer=out.text, model=out.model, contexts=contexts,
            retrieval_latency_s=t1 - t0, generation_latency_s=time.perf_counter() - t1,
            prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
        )


# -- HTTP ---------------------------------------------------------------------------------------
def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=error_body(message, kind))


class GuardMiddleware:
    """Bearer-token auth and the body-size limit, before a request is parsed (plain ASGI, so
    streamed responses and client disconnects pass through untouched)."""

    def __init__(self, app, settings: IngressSettings):
        self.app, self.s = app, settings
        token = settings.auth_token.get_secret_value() if settings.auth_token else None
        self._expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            path = scope["path"].removeprefix(scope.get("root_path", "")) or "/"
            if path not in OPEN_PATHS:
                headers = dict(scope["headers"])
                refusal = self._refusal(headers)
                if refusal is None and b"content-length" not in headers:
                    # A chunked body states no length: read it here, up to the limit.
                    body = await self._body_within_limit(receive)
                    if body is None:
                        refusal = _error(413, f"request body exceeds the limit of {self.s.max_request_bytes} "
                                         "bytes", "invalid_request_error")
                    else:
                        receive = _replayed(body, receive)
                if refusal is not None:
                    await refusal(scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _body_within_limit(self, receive) -> bytes | None:
        """The whole request body, or None once it passes max_request_bytes (the rest unread)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return b"".join(chunks)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.s.max_request_bytes:
                return None
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _refusal(self, headers: dict[bytes, bytes]) -> JSONResponse | None:
        if self._expected is not None:
            given = headers.get(b"authorization")
            if given is None:
                return _error(401, "missing bearer token: send 'Authorization: Bearer <token>'",
                              "authentication_error")
            if not hmac.compare_digest(given, self._expected):  # constant time
                return _error(401, "invalid bearer token", "authentication_error")
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.s.max_request_bytes:
            return _error(413, f"request body of {int(length)} bytes exceeds the limit of "
                          f"{self.s.max_request_bytes}", "invalid_request_error")
        return None


def _replayed(body: bytes, receive):
    """An ASGI receive that hands the app `body` as one message, then waits on the real one
    (which reports the client's disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


def _install_error_handlers(api: FastAPI) -> None:
    # FastAPI's own 4xx (a body it cannot parse: invalid UTF-8, JSON nested past the decoder's
    # depth; unknown routes and methods) in the same error shape as every other answer.
    @api.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException):
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        response = _error(exc.status_code, str(exc.detail), kind)
        response.headers.update(exc.headers or {})
        return response

    @api.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(400, f"{where}: {first.get('msg')}", "invalid_request_error")

    statuses = {
        RequestError: None, UnknownModelError: (404, "model_not_found"),
        InvalidStructuredOutput: (400, "invalid_request_error"), PromptTooLong: (400, "invalid_request_error"),
        InvalidMessages: (400, "invalid_request_error"),
        UpstreamTimeout: (504, "timeout"), UpstreamUnavailable: (503, "service_unavailable"),
    }
    for exc_type, answer in statuses.items():
        def handler(_: Request, exc: Exception, answer=answer):
            status, kind = answer or (exc.status, exc.kind)
            return _error(status, cause_message(exc), kind)

        api.add_exception_handler(exc_type, handler)

    @api.exception_handler(Exception)
    async def _server_error(_: Request, exc: Exception):
        return _error(500, f"{type(getattr(exc, 'cause', None) or exc).__name__}: {cause_message(exc)}",
                      "server_error")


def _with_retries(response: Response, stats: dict) -> None:
    if stats.get("retries"):
        response.headers[RETRIES_HEADER] = str(stats["retries"])


async def _answered(call, req, response: Response | None = None):
    """Run one service call and report its upstream retries in a header. Without `response` the
    body comes back as a JSONResponse, rendered as it is: FastAPI would first walk every value
    through its generic encoder (for embeddings, every float of every vector: 5% of the ingress's
    CPU at 70 requests/s, py-spy)."""
    stats: dict = {}
    body = await call(req, stats)
    if response is None:
        body = response = JSONResponse(body)
    _with_retries(response, stats)
    return body


def build_api(service: RAGService) -> FastAPI:
    api = FastAPI(title="ray_ft RAG")
    _install_error_handlers(api)
    api.add_middleware(GuardMiddleware, settings=service.s)

    @api.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models():
        return await service.models()

    @api.post("/v1/chat/completions")
    async def chat(req: ChatCompletionRequest, response: Response):
        if req.stream:
            stats: dict = {}
            events = await service.chat_stream(req, stats)
            headers = {RETRIES_HEADER: str(stats["retries"])} if stats.get("retries") else None
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return await _answered(service.chat, req, response)

    @api.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        return await _answered(service.embeddings, req)

    @api.post("/v1/retrieve", response_model=RetrieveResponse)
    async def retrieve(req: RetrieveRequest, response: Response):
        return await _answered(service.retrieve, req, response)

    @api.post("/v1/rag", response_model=RAGResponse)
    async def rag(req: RAGRequest, response: Response):
        return await _answered(service.rag, req, response)

    return api
