"""The RAG graph on Ray Serve: embedder -> retriever -> generator behind one FastAPI ingress.

Endpoints: `POST /v1/chat/completions` (with `response_format` JSON / JSON-schema output),
`POST /v1/embeddings`, `GET /v1/models`, `POST /v1/rag`, `POST /v1/retrieve`, `GET /healthz`. Bad requests get a 4xx JSON error `{"error": {"message", "type"}}` and the
service keeps serving.

Logical CPUs are planned so the whole graph fits on a 2-core machine: the generator reserves
`serve.generator_cpus`, the embedder `serve.embedder_cpus`, retriever and ingress 0.1 each (they
only wait on the others); Serve's proxy and controller reserve none.
"""

from __future__ import annotations

import asyncio
import base64
import time
from dataclasses import dataclass

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig

from ray_ft.config import JobConfig
from ray_ft.data.templates import rag_messages
from ray_ft.serve.engines import (
    InvalidStructuredOutput, SentenceTransformerEmbedder, UnknownModelError, VectorIndex,
    VLLMGenerator, build_nodes,
)
from ray_ft.serve.schemas import (
    ChatCompletionRequest, EmbeddingRequest, RAGRequest, RAGResponse, RetrievedContext,
    RetrieveRequest, RetrieveResponse,
)

MAX_EMBED_INPUTS = 256


@serve.deployment(max_ongoing_requests=64)
class GeneratorDeployment:
    def __init__(self, **kwargs):
        self.gen = VLLMGenerator(**kwargs)

    def model_names(self) -> list[str]:
        return self.gen.model_names()

    async def generate(self, messages: list[dict], model: str, max_tokens: int, temperature: float,
                       structured: dict | None = None):
        return await self.gen.generate(messages, model, max_tokens, temperature, structured)

    def __del__(self):
        if hasattr(self, "gen"):
            self.gen.shutdown()


@serve.deployment(max_ongoing_requests=64)
class EmbedderDeployment:
    def __init__(self, model_dir: str, threads: int = 0):
        import os

        import torch

        # Ray sets OMP/torch threads from num_cpus (1 for a fractional actor); the embedder runs
        # in bursts (index build, eval scoring), so it may use every core of the node.
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)) or 1)
        self.embedder = SentenceTransformerEmbedder(model_dir)

    def embed(self, texts: list[str]) -> np.ndarray:
        return self.embedder.embed(texts)


@serve.deployment(max_ongoing_requests=64)
class RetrieverDeployment:
    """Exact-cosine index over the knowledge base; vectors come from the embedder deployment."""

    def __init__(self, documents: list[dict], node_group: str, embedder: DeploymentHandle):
        self.nodes = build_nodes(documents, node_group)
        self.embedder = embedder
        self.index: VectorIndex | None = None
        self._lock = asyncio.Lock()

    async def ready(self) -> int:
        async with self._lock:
            if self.index is None:
                vecs = await self.embedder.embed.remote([n["text"] for n in self.nodes])
                self.index = VectorIndex(self.nodes, vecs)
        return len(self.nodes)

    async def retrieve(self, query: str, top_k: int):
        await self.ready()
        qvec = (await self.embedder.embed.remote([query]))[0]
        return self.index.search(qvec, top_k)


@dataclass(frozen=True)
class IngressSettings:
    base_name: str
    language: str
    system_prompt: str
    top_k: int
    max_tokens: int
    max_tokens_limit: int


def _error(status: int, message: str, kind: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": {"message": message, "type": kind}})


def build_fastapi(settings: IngressSettings) -> FastAPI:
    api = FastAPI(title="ray_ft RAG")

    @api.exception_handler(RequestValidationError)
    async def _bad_request(_: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(400, f"{where}: {first.get('msg')}", "invalid_request_error")

    @api.exception_handler(InvalidStructuredOutput)
    async def _bad_schema(_: Request, exc: InvalidStructuredOutput):
        return _error(400, str(exc), "invalid_request_error")

    @api.exception_handler(UnknownModelError)
    async def _unknown_model(_: Request, exc: UnknownModelError):
        return _error(404, str(exc), "model_not_found")

    return api


def _check_max_tokens(requested: int | None, s: IngressSettings) -> int:
    n = requested or s.max_tokens
    if n > s.max_tokens_limit:
        raise ValueError(f"max_tokens={n} exceeds the limit {s.max_tokens_limit}")
    return n


def make_ingress(settings: IngressSettings):
    api = build_fastapi(settings)

    @serve.deployment(max_ongoing_requests=128)
    @serve.ingress(api)
    class RAGIngress:
        def __init__(self, generator: DeploymentHandle, retriever: DeploymentHandle,
                     embedder: DeploymentHandle):
            self.generator, self.retriever, self.embedder = generator, retriever, embedder
            self.s = settings

        @api.get("/healthz")
        async def healthz(self):
            return {"status": "ok"}

        @api.get("/v1/models")
        async def models(self):
            names = await self.generator.model_names.remote()
            return {"object": "list",
                    "data": [{"id": n, "object": "model", "owned_by": "ray_ft"} for n in names]}

        @api.post("/v1/chat/completions")
        async def chat(self, req: ChatCompletionRequest):
            if req.stream:
                return _error(400, "stream=true is not supported yet", "invalid_request_error")
            try:
                max_tokens = _check_max_tokens(req.max_tokens, self.s)
            except ValueError as err:
                return _error(400, str(err), "invalid_request_error")
            structured = req.response_format.structured() if req.response_format else None
            out = await self.generator.generate.remote(
                [m.model_dump() for m in req.messages], req.model, max_tokens, req.temperature,
                structured)
            return {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion",
                "created": int(time.time()), "model": out.model,
                "choices": [{"index": 0, "finish_reason": out.finish_reason,
                             "message": {"role": "assistant", "content": out.text}}],
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.prompt_tokens + out.completion_tokens},
            }

        @api.post("/v1/embeddings")
        async def embeddings(self, req: EmbeddingRequest):
            texts = [req.input] if isinstance(req.input, str) else req.input
            if not texts or len(texts) > MAX_EMBED_INPUTS:
                return _error(400, f"input must hold 1 to {MAX_EMBED_INPUTS} texts", "invalid_request_error")
            vecs = await self.embedder.embed.remote(texts)
            if req.encoding_format == "base64":
                encoded = [base64.b64encode(v.astype("<f4").tobytes()).decode() for v in vecs]
            else:
                encoded = [v.tolist() for v in vecs]
            return {"object": "list", "model": req.model or "embedder",
                    "data": [{"object": "embedding", "index": i, "embedding": e}
                             for i, e in enumerate(encoded)]}

        @api.post("/v1/retrieve", response_model=RetrieveResponse)
        async def retrieve(self, req: RetrieveRequest):
            t0 = time.perf_counter()
            hits = await self.retriever.retrieve.remote(req.query, req.top_k or self.s.top_k)
            return RetrieveResponse(
                contexts=[RetrievedContext(node_id=h.node_id, text=h.text, score=h.score) for h in hits],
                latency_s=time.perf_counter() - t0)

        @api.post("/v1/rag", response_model=RAGResponse)
        async def rag(self, req: RAGRequest):
            try:
                max_tokens = _check_max_tokens(req.max_tokens, self.s)
            except ValueError as err:
                return _error(400, str(err), "invalid_request_error")
            t0 = time.perf_counter()
            if req.contexts is not None:
                if not req.contexts:
                    return _error(400, "contexts: give at least one passage or leave it out",
                                  "invalid_request_error")
                contexts = [RetrievedContext(node_id=None, text=c, score=None) for c in req.contexts]
            else:
                hits = await self.retriever.retrieve.remote(req.query, req.top_k or self.s.top_k)
                contexts = [RetrievedContext(node_id=h.node_id, text=h.text, score=h.score) for h in hits]
            t1 = time.perf_counter()
            messages = rag_messages([c.text for c in contexts], req.query, self.s.language,
                                    self.s.system_prompt)
            out = await self.generator.generate.remote(
                messages, req.model or self.s.base_name, max_tokens, req.temperature)
            return RAGResponse(
                answer=out.text, model=out.model, contexts=contexts,
                retrieval_latency_s=t1 - t0, generation_latency_s=time.perf_counter() - t1,
                prompt_tokens=out.prompt_tokens, completion_tokens=out.completion_tokens,
            )

    return RAGIngress


def build_rag_app(cfg: JobConfig, model_dir: str, embedder_dir: str, adapters: dict[str, str],
                  documents: list[dict]):
    """The bound Serve application for `cfg` (deploy it with `serve.run`)."""
    s = cfg.serve
    embedder = EmbedderDeployment.options(ray_actor_options={"num_cpus": s.embedder_cpus}).bind(
        embedder_dir, s.embedder_threads)
    retriever = RetrieverDeployment.options(ray_actor_options={"num_cpus": 0.1}).bind(
        documents, s.node_group, embedder)
    generator = GeneratorDeployment.options(
        ray_actor_options={"num_cpus": s.generator_cpus, "num_gpus": 1 if cfg.train.use_gpu else 0},
    ).bind(model_dir=model_dir, base_name=cfg.model.name, adapters=adapters, vcfg=s.vllm,
           system_prompt=cfg.model.system_prompt, use_gpu=cfg.train.use_gpu)
    settings = IngressSettings(
        base_name=cfg.model.name, language=cfg.data.language, system_prompt=cfg.model.system_prompt,
        top_k=s.top_k, max_tokens=s.max_tokens, max_tokens_limit=s.vllm.max_model_len // 2,
    )
    ingress = make_ingress(settings).options(ray_actor_options={"num_cpus": 0.1})
    return ingress.bind(generator, retriever, embedder)


def deploy(cfg: JobConfig, model_dir: str, embedder_dir: str, adapters: dict[str, str],
           documents: list[dict]) -> str:
    """Start Serve on 127.0.0.1:`serve.http_port`, deploy the graph, build the index; return the URL."""
    serve.start(http_options={"host": "127.0.0.1", "port": cfg.serve.http_port})
    serve.run(build_rag_app(cfg, model_dir, embedder_dir, adapters, documents),
              name="ray_ft", route_prefix="/", blocking=False,
              logging_config=LoggingConfig(enable_access_log=False))  # one line per call is noise
    # Embed the knowledge base now, so the first request does not pay for it.
    retriever = serve.get_deployment_handle("RetrieverDeployment", app_name="ray_ft")
    retriever.ready.remote().result(timeout_s=600)
    return f"http://127.0.0.1:{cfg.serve.http_port}"
