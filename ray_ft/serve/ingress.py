"""The HTTP face of the RAG graph: a FastAPI app over the generator, retriever and embedder.

Endpoints: `POST /v1/chat/completions` (OpenAI format; `stream: true` answers with server-sent
events; `response_format` JSON / JSON-schema output), `POST /v1/embeddings`, `GET /v1/models`,
`POST /v1/rag`, `POST /v1/retrieve`, `POST /v1/rerank` (with a reranker), `GET /healthz`, and
with a LanceDB knowledge base `POST /v1/documents` / `DELETE /v1/documents/{id}` (bearer auth
required) to add, replace or remove documents while serving; with `serve.live_adapters`
`POST /v1/adapters` / `DELETE /v1/adapters/{name}` (bearer auth required) register LoRA adapters
that every engine replica serves from its next request.
With a reranker, retrieval fetches `rerank_candidates` passages and keeps the `top_k` that the
cross-encoder scores best; both stages' scores and the first stage's rank come back.

`RAGService` holds what the endpoints do (validation, prompt, calls with retries and one deadline
per request) and `build_api` wraps it in FastAPI, so both can be tested with fake deployment
handles, without Ray. Bad requests get a 4xx JSON error `{"error": {"message", "type"}}` that
says what is wrong, and the service keeps serving. A response whose call had to be re-sent
because a replica died carries `x-ray-ft-retries`.
"""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import FastAPI, Path, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import SecretStr

from ray_ft.errors import RayFTError
from ray_ft.paths import SAFE_NAME_REGEX
from ray_ft.serve.http_guard import GuardMiddleware, cause_message, install_error_handlers
from ray_ft.serve.openapi import (
    ChatCompletion, DeletedAdapter, EmbeddingList, Health, ModelList, documented, publish_truthful_schema,
)
from ray_ft.serve.openai_format import SSE_DONE, ChunkWriter, completion_body, error_body, sse
from ray_ft.serve.prompting import RAGPrompt
from ray_ft.serve.resilience import (
    Deadline, UpstreamTimeout, call_with_retries, next_item,
    open_stream_with_retries,
)
from ray_ft.serve.schemas import (
    AdapterRequest, AdapterResponse, ChatCompletionRequest, DeletedDocument, DocumentsRequest, DocumentsResponse, EmbeddingRequest,
    RAGRequest, RAGResponse, RerankRequest, RerankResponse, RerankResult, RetrievedContext,
    RetrieveRequest, RetrieveResponse,
)

RETRIES_HEADER = "x-ray-ft-retries"


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
    rerank_candidates: int | None = None  # None: no reranker in the graph
    max_rerank_documents: int = 256
    live_adapters: "LiveAdapterSettings | None" = None  # POST/DELETE /v1/adapters


@dataclass(frozen=True)
class LiveAdapterSettings:
    registry: str
    allowed_roots: tuple[str, ...]
    allowed_schemes: tuple[str, ...]
    base_dir: str  # the base model's folder: adapters must fit its projections
    max_rank: int
    fixed_names: tuple[str, ...]  # base, job adapters, whole models: not replaceable or removable


class RequestError(RayFTError):
    """A request the service refuses, with the HTTP status and OpenAI error type to answer with,
    and a `code` when the refusal is one the published schema cannot state (LIMIT_CODES)."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


class RAGService:
    """The endpoints' work, apart from HTTP."""

    def __init__(self, generator: Any, retriever: Any, embedder: Any, settings: IngressSettings,
                 engines: dict[str, Any] | None = None, reranker: Any | None = None):
        """`generator` serves the base model and its adapters; `engines` the whole models that
        run on engines of their own (merged or fully fine-tuned), by served name; `reranker`
        the cross-encoder (with `settings.rerank_candidates`)."""
        if (reranker is None) != (settings.rerank_candidates is None):
            raise ValueError("a reranker needs settings.rerank_candidates, and rerank_candidates a reranker")
        self.generator, self.retriever, self.embedder, self.reranker = generator, retriever, embedder, reranker
        self.engines = engines or {}
        self.s = settings
        self._registry = None

    def _engine(self, model: str) -> Any:
        if model in self.engines:
            return self.engines[model]
        if self.s.model_names and model not in self.s.model_names and model not in self._live_names():
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
            raise RequestError(400, f"{what}: {n} characters exceed the limit of {self.s.max_input_chars}",
                               code="input_too_long")

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

    def _reranks(self, asked: bool | None) -> bool:
        if asked and self.reranker is None:
            raise RequestError(400, "rerank: no reranker is served here (serve.rerank.enabled is off)",
                               code="rerank_unavailable")
        return self.reranker is not None and asked is not False

    async def _retrieve(self, query: str, top_k: int | None, deadline: Deadline, stats: dict,
                        rerank: bool | None = None) -> list[RetrievedContext]:
        k, reranks = top_k or self.s.top_k, self._reranks(rerank)
        fetch = max(k, self.s.rerank_candidates) if reranks else k
        hits = await self._call(lambda: self.retriever.retrieve.remote(query, fetch), "retriever", deadline, stats)
        contexts = [RetrievedContext(node_id=h.node_id, text=h.text, score=h.score, retrieval_score=h.score,
                                     retrieval_rank=i) for i, h in enumerate(hits)]
        if not reranks or not contexts:
            return contexts[:k]
        texts = [c.text for c in contexts]
        scores = await self._call(lambda: self.reranker.rerank.remote(query, texts), "reranker", deadline, stats)
        order = _best_first(scores)
        return [contexts[i].model_copy(update={"score": float(scores[i]), "rerank_score": float(scores[i])})
                for i in order[:k]]

    async def rerank(self, req: RerankRequest, stats: dict) -> dict:
        if self.reranker is None:
            raise RequestError(404, "no reranker is served here (serve.rerank.enabled is off)", "not_found_error")
        texts = req.texts
        n = len(texts)
        if not 1 <= n <= self.s.max_rerank_documents:
            raise RequestError(400, f"documents must hold 1 to {self.s.max_rerank_documents} texts, got {n}")
        self._check_chars(len(req.query) + sum(len(d) for d in texts), "query and documents")
        scores = await self._call(lambda: self.reranker.rerank.remote(req.query, texts), "reranker",
                                  Deadline(self.s.request_timeout_s), stats)
        order = _best_first(scores)[: req.top_n or n]
        results = [RerankResult(index=i, relevance_score=float(scores[i]),
                                document={"text": texts[i]} if req.return_documents else None)
                   for i in order]
        return RerankResponse(id=f"rerank-{uuid.uuid4().hex}", model=req.model or "reranker", results=results).model_dump(exclude_none=True)

    async def retrieve(self, req: RetrieveRequest, stats: dict) -> RetrieveResponse:
        self._check_chars(len(req.query), "query")
        t0 = time.perf_counter()
        contexts = await self._retrieve(req.query, req.top_k, Deadline(self.s.request_timeout_s), stats, req.rerank)
        return RetrieveResponse(contexts=contexts, latency_s=time.perf_counter() - t0)

    def _write_allowed(self, enabled: bool, off: str, what: str) -> None:
        if not enabled:
            raise RequestError(404, off, "not_found_error")
        if self.s.auth_token is None:  # a write endpoint is never open to anyone who can reach the port
            raise RequestError(403, f"{what} needs bearer auth (serve.auth_token_env)", "permission_error")

    def _writes(self) -> None:
        self._write_allowed(True, "", "document writes")

    async def add_documents(self, req: DocumentsRequest, stats: dict) -> DocumentsResponse:
        self._writes()
        if len(req.documents) > self.s.max_embed_inputs:
            raise RequestError(400, f"documents: {len(req.documents)} exceed the limit of {self.s.max_embed_inputs}")
        self._check_chars(sum(len(d.text) for d in req.documents), "documents")
        docs = [d.model_dump() for d in req.documents]
        out = await self._call(lambda: self.retriever.add_documents.remote(docs), "retriever",
                               Deadline(self.s.request_timeout_s), stats)
        return DocumentsResponse(**out)

    async def delete_document(self, document_id: str, stats: dict) -> DeletedDocument:
        self._writes()
        out = await self._call(lambda: self.retriever.delete_document.remote(document_id), "retriever",
                               Deadline(self.s.request_timeout_s), stats)
        if not out["deleted_nodes"]:
            raise RequestError(404, f"no document '{document_id}' in the knowledge base", "not_found_error")
        return DeletedDocument(**out)

    def _adapter_registry(self):
        if self._registry is None:
            from ray_ft.serve.adapter_registry import AdapterRegistry

            self._registry = AdapterRegistry(self.s.live_adapters.registry)
        return self._registry

    def _live_names(self) -> dict[str, str]:
        # a stat of the file; re-read only when it changed
        return self._adapter_registry().read() if self.s.live_adapters is not None else {}

    def _adapters(self) -> LiveAdapterSettings:
        self._write_allowed(self.s.live_adapters is not None, "live adapters are off (serve.live_adapters.enabled)",
                            "adapter registration")
        return self.s.live_adapters

    def _live_name(self, name: str, a: LiveAdapterSettings) -> None:
        from ray_ft.paths import name_problem

        problem = name_problem(name)
        if problem:
            raise RequestError(400, f"name {name!r} {problem}")
        if name in a.fixed_names or name in self.engines:
            raise RequestError(409, f"name {name!r} is served by the job's own config; pick another", "conflict")

    async def add_adapter(self, req: AdapterRequest, stats: dict) -> AdapterResponse:
        """Check the adapter (location allowed, a LoRA of an allowed rank that fits the base,
        readable weights) and register it; engine replicas load it on its first request."""
        from ray_ft.serve.adapter_registry import check_live_adapter

        a = self._adapters()
        self._live_name(req.name, a)
        try:
            location = await asyncio.to_thread(check_live_adapter, req.location, list(a.allowed_roots),
                                               list(a.allowed_schemes), a.base_dir, a.max_rank)
        except (RayFTError, OSError) as err:  # BadAdapter, an unreachable URI, a missing config
            raise RequestError(400, f"adapter {req.name!r}: {cause_message(err)}", code="adapter_rejected") from None
        await asyncio.to_thread(self._adapter_registry().add, req.name, location)
        return AdapterResponse(id=req.name, location=location)

    async def delete_adapter(self, name: str, stats: dict) -> dict:
        a = self._adapters()
        self._live_name(name, a)
        if not await asyncio.to_thread(self._adapter_registry().remove, name):
            raise RequestError(404, f"no live adapter '{name}'", "not_found_error")
        return {"id": name, "object": "model", "deleted": True}

    async def rag(self, req: RAGRequest, stats: dict) -> RAGResponse:
        max_tokens = self._max_tokens(req.max_tokens)
        self._check_chars(len(req.query) + sum(len(c) for c in req.contexts or ()), "query and contexts")
        deadline = Deadline(self.s.request_timeout_s)  # one budget for retrieval and generation
        t0 = time.perf_counter()
        if req.contexts is not None:
            contexts = [RetrievedContext(node_id=None, text=c, score=None) for c in req.contexts]
        else:
            contexts = await self._retrieve(req.query, req.top_k, deadline, stats, req.rerank)
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


def _best_first(scores) -> list[int]:
    """Indices by descending score; ties keep their given order (the first stage's rank)."""
    return sorted(range(len(scores)), key=lambda i: -float(scores[i]))


# -- HTTP ---------------------------------------------------------------------------------------
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
    s = service.s
    publish_truthful_schema(api, auth=s.auth_token is not None, max_tokens=s.max_tokens_limit,
                            max_texts=s.max_embed_inputs, max_rerank_documents=s.max_rerank_documents)
    install_error_handlers(api, RequestError)
    api.add_middleware(GuardMiddleware, settings=s)

    @api.get("/healthz", responses={200: {"model": Health}})
    async def healthz():
        return {"status": "ok"}

    @api.get("/v1/models", responses=documented(ModelList))
    async def models():
        return await service.models()

    @api.post("/v1/chat/completions", responses=documented(ChatCompletion, 404, stream=True))
    async def chat(req: ChatCompletionRequest, response: Response):
        if req.stream:
            stats: dict = {}
            events = await service.chat_stream(req, stats)
            headers = {RETRIES_HEADER: str(stats["retries"])} if stats.get("retries") else None
            return StreamingResponse(events, media_type="text/event-stream", headers=headers)
        return await _answered(service.chat, req, response)

    @api.post("/v1/embeddings", responses=documented(EmbeddingList))
    async def embeddings(req: EmbeddingRequest):
        return await _answered(service.embeddings, req)

    @api.post("/v1/retrieve", response_model=RetrieveResponse, responses=documented(None))
    async def retrieve(req: RetrieveRequest, response: Response):
        return await _answered(service.retrieve, req, response)

    @api.post("/v1/rerank", response_model=RerankResponse, response_model_exclude_none=True,
              responses=documented(None, 404))
    async def rerank(req: RerankRequest):
        return await _answered(service.rerank, req)

    @api.post("/v1/documents", response_model=DocumentsResponse, responses=documented(None, 403))
    async def add_documents(req: DocumentsRequest, response: Response):
        return await _answered(service.add_documents, req, response)

    @api.delete("/v1/documents/{document_id}", response_model=DeletedDocument, responses=documented(None, 403, 404))
    async def delete_document(document_id: str, response: Response):
        return await _answered(service.delete_document, document_id, response)

    @api.post("/v1/adapters", response_model=AdapterResponse, responses=documented(None, 403, 404, 409))
    async def add_adapter(req: AdapterRequest, response: Response):
        return await _answered(service.add_adapter, req, response)

    @api.delete("/v1/adapters/{name}", responses=documented(DeletedAdapter, 403, 404, 409))
    async def delete_adapter(name: Annotated[str, Path(json_schema_extra={"pattern": SAFE_NAME_REGEX, "maxLength": 128})]):
        return await _answered(service.delete_adapter, name)

    @api.post("/v1/rag", response_model=RAGResponse, responses=documented(None, 404))
    async def rag(req: RAGRequest, response: Response):
        return await _answered(service.rag, req, response)

    return api
