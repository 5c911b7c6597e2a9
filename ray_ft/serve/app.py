"""The RAG graph on Ray Serve: embedder -> retriever -> generator behind one FastAPI ingress
(`ray_ft.serve.ingress`).

Logical CPUs are planned so the whole graph fits on a 2-core machine: the generator reserves
`serve.generator_cpus`, the embedder `serve.embedder_cpus`, retriever and ingress 0.1 each (they
only wait on the others); Serve's proxy and controller reserve none. A whole model served beside
the base (`serve.models`, a freeze/full fine-tune) runs on an engine of its own that reserves
`serve.generator_cpus` too. Replicas, autoscaling, health checks and graceful shutdown come from
`serve.deployments.*`.
"""

from __future__ import annotations

import asyncio
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from pydantic import SecretStr
from ray import serve
from ray.serve.handle import DeploymentHandle
from ray.serve.schema import LoggingConfig

from ray_ft.config import EmbedderBatching, JobConfig, NodeGroupConfig, RetrievalSettings
from ray_ft.data.nodes import build_nodes
from ray_ft.errors import RayFTError
from ray_ft.paths import inside
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.serve.engines import VectorIndex, VLLMGenerator
from ray_ft.serve.ingress import IngressSettings, RAGService, build_api
from ray_ft.serve.prompting import rag_prompt_of
from ray_ft.serve.resilience import Deadline, call_with_retries
from ray_ft.serve.retrieval import (
    BM25Index, load_index, nodes_fingerprint, reciprocal_rank_fusion, save_index,
)

APP_NAME = "ray_ft"


@serve.deployment
class GeneratorDeployment:
    def __init__(self, **kwargs):
        self.gen = VLLMGenerator(**kwargs)

    def model_names(self) -> list[str]:
        return self.gen.model_names()

    async def generate(self, messages: list[dict], model: str, max_tokens: int, temperature: float,
                       structured: dict | None = None, sampling: dict | None = None):
        return await self.gen.generate(messages, model, max_tokens, temperature, structured, sampling)

    async def stream(self, messages: list[dict], model: str, max_tokens: int, temperature: float,
                     structured: dict | None = None, sampling: dict | None = None):
        async for piece in self.gen.stream(messages, model, max_tokens, temperature, structured, sampling):
            yield piece

    async def check_health(self) -> None:
        await self.gen.check_health()

    def __del__(self):
        if hasattr(self, "gen"):
            self.gen.shutdown()


@serve.deployment
class EmbedderDeployment:
    """Sentence-transformers behind `@serve.batch`: requests that arrive together (up to
    `max_batch_size`, waiting at most `batch_wait_timeout_s` for company) are encoded in one
    model call. The batch settings are the deployment's `user_config`, so `serve deploy` can
    change them without restarting the replica."""

    def __init__(self, model_dir: str, threads: int = 0, dtype: str = "float32"):
        import torch

        # Ray sets OMP/torch threads from num_cpus (1 for a fractional actor); the embedder runs
        # in bursts (index build, eval scoring), so it may use every core of the node.
        torch.set_num_threads(threads or len(os.sched_getaffinity(0)) or 1)
        self.embedder = SentenceTransformerEmbedder(model_dir, dtype=dtype)
        self.calls = {"model_calls": 0, "requests": 0, "texts": 0, "model_s": 0.0}
        # Batcher per instance, not a decorator on the class: its queue binds to the event loop
        # of first use, and a class carrying it could no longer be pickled (by Serve, on deploy).
        b = EmbedderBatching()
        self._embed_batch = serve.batch(max_batch_size=b.max_batch_size,
                                        batch_wait_timeout_s=b.batch_wait_timeout_s)(self._encode_requests)

    def reconfigure(self, batching: dict) -> None:
        b = EmbedderBatching.model_validate(batching)
        self._embed_batch.set_max_batch_size(b.max_batch_size)
        self._embed_batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await self._embed_batch(list(texts))

    async def _encode_requests(self, requests: list[list[str]]) -> list[np.ndarray]:
        flat = [t for texts in requests for t in texts]
        t0 = time.perf_counter()
        # On the event loop on purpose: requests that arrive meanwhile wait in the actor's queue
        # and form the next batch. Run in a thread, the model (Python-heavy at these sizes) and
        # the loop fought over the GIL and batches stayed at ~1.3 requests with 32 in flight
        # (measured; 12 on the loop).
        vecs = self.embedder.embed(flat)
        self.calls["model_s"] += time.perf_counter() - t0
        self.calls["model_calls"] += 1
        self.calls["requests"] += len(requests)
        self.calls["texts"] += len(flat)
        bounds = np.cumsum([0, *(len(t) for t in requests)])
        return [vecs[a:b] for a, b in zip(bounds[:-1], bounds[1:])]

    def batch_stats(self) -> dict:
        """Model calls, requests, texts and seconds in the model so far (requests / calls = mean
        batch)."""
        return dict(self.calls)


@serve.deployment
class RerankerDeployment:
    """A cross-encoder behind `@serve.batch`: the (query, passages) of requests that arrive
    together are scored in one model call (`ray_ft.reranker`)."""

    def __init__(self, model_dir: str, threads: int = 0, dtype: str = "float32", max_len: int = 512,
                 max_batch_size: int = 8, batch_wait_timeout_s: float = 0.005):
        import torch

        from ray_ft.reranker import CrossEncoderReranker

        torch.set_num_threads(threads or len(os.sched_getaffinity(0)) or 1)  # as the embedder
        self.reranker = CrossEncoderReranker(model_dir, max_len=max_len, dtype=dtype)
        self.calls = {"model_calls": 0, "requests": 0, "pairs": 0, "model_s": 0.0}
        self._score_batch = serve.batch(max_batch_size=max_batch_size,
                                        batch_wait_timeout_s=batch_wait_timeout_s)(self._score_requests)

    async def rerank(self, query: str, passages: list[str]) -> np.ndarray:
        """Relevance of each passage to the query, in (0, 1)."""
        return await self._score_batch((query, list(passages)))

    async def _score_requests(self, requests: list[tuple[str, list[str]]]) -> list[np.ndarray]:
        from ray_ft.reranker import relevance

        queries = [q for q, passages in requests for _ in passages]
        passages = [p for _, ps in requests for p in ps]
        t0 = time.perf_counter()
        logits = self.reranker.logits(queries, passages)  # on the loop, as the embedder (batches form)
        self.calls["model_s"] += time.perf_counter() - t0
        self.calls["model_calls"] += 1
        self.calls["requests"] += len(requests)
        self.calls["pairs"] += len(passages)
        bounds = np.cumsum([0, *(len(ps) for _, ps in requests)])
        return [relevance(logits[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    def batch_stats(self) -> dict:
        return dict(self.calls)


@serve.deployment
class RetrieverDeployment:
    """Knowledge-base nodes ranked by exact cosine (vectors from the embedder deployment), BM25,
    or both fused by reciprocal rank (`serve.retrieval`). With `index_dir` the dense index is
    saved there and reloaded while the nodes and the embedder are unchanged."""

    def __init__(self, documents: list[dict], node_group: NodeGroupConfig | str, embedder: DeploymentHandle,
                 timeout_s: float = 300.0, retries: int = 2, retrieval: dict | None = None,
                 index_dir: str | None = None, embedder_id: str = ""):
        self.nodes = build_nodes(documents, node_group)
        self.embedder = embedder
        self.timeout_s, self.retries = timeout_s, retries
        self.r = RetrievalSettings.model_validate(retrieval or {"mode": "dense"})
        if self.r.mode == "auto":
            raise ValueError("retrieval mode 'auto' must be resolved for the job's language first "
                             "(ServeConfig.retrieval_for)")
        self.bm25 = BM25Index(self.nodes, self.r.bm25_k1, self.r.bm25_b) if self.r.mode != "dense" else None
        self.index_dir = Path(index_dir) if index_dir else None
        self.fingerprint = nodes_fingerprint(self.nodes, embedder_id)
        self.index: VectorIndex | None = None
        self.index_source = None  # "built" or "loaded", once the index is there
        self._build: asyncio.Future | None = None

    async def _embed(self, texts: list[str], timeout_s: float) -> np.ndarray:
        return await call_with_retries(lambda: self.embedder.embed.remote(texts), "embedder",
                                       Deadline(timeout_s), self.retries)

    async def _build_index(self) -> None:
        vecs = load_index(self.index_dir, self.fingerprint) if self.index_dir else None
        source = "loaded" if vecs is not None else "built"
        if vecs is None:
            # The whole knowledge base in one call: may take long, so no request deadline.
            vecs = await self._embed([n["text"] for n in self.nodes], timeout_s=24 * 3600)
            if self.index_dir:
                save_index(self.index_dir, self.fingerprint, vecs)
        self.index, self.index_source = VectorIndex(self.nodes, vecs), source

    def _index_build(self) -> asyncio.Future | None:
        """The one build of the dense index, started on first need. It runs apart from the
        request that started it: a request cancelled at its deadline does not cancel the build
        (else a knowledge base slower to embed than a request's deadline would never finish)."""
        if self._build is None and self.r.mode != "bm25":
            self._build = asyncio.ensure_future(self._build_index())
            self._build.add_done_callback(self._forget_failed_build)
        return self._build

    def _forget_failed_build(self, build: asyncio.Future) -> None:
        if build.cancelled() or build.exception() is not None:
            self._build = None  # the next request or health check starts over

    async def check_health(self) -> None:
        """Serve calls this every few seconds from the replica's start: a new replica
        (autoscaled, or replacing a dead one) builds its index before its first request."""
        self._index_build()

    async def ready(self) -> dict:
        build = self._index_build()
        if build is not None:
            await asyncio.shield(build)
        return {"nodes": len(self.nodes), "mode": self.r.mode, "index": self.index_source}

    async def retrieve(self, query: str, top_k: int):
        await self.ready()
        if self.r.mode == "bm25":
            return self.bm25.search(query, top_k)
        qvec = (await self._embed([self.r.query_instruction + query], self.timeout_s))[0]
        if self.r.mode == "dense":
            return self.index.search(qvec, top_k)
        n = max(top_k, self.r.candidates)
        return reciprocal_rank_fusion([self.index.search(qvec, n), self.bm25.search(query, n)],
                                      top_k, self.r.rrf_k)


@serve.deployment
@serve.ingress()
class RAGIngress:
    def __init__(self, generator: DeploymentHandle, retriever: DeploymentHandle,
                 embedder: DeploymentHandle, settings: IngressSettings,
                 engines: dict[str, DeploymentHandle] | None = None, reranker: DeploymentHandle | None = None):
        self.service = RAGService(generator, retriever, embedder, settings, engines, reranker)

    def __serve_build_asgi_app__(self):
        # Built in the replica, around this replica's service (and its handles).
        return build_api(self.service)


def embedder_identity(embedder_dir: str, dtype: str) -> str:
    """Names the embedder in a persisted index's fingerprint: folder, dtype and the newest file
    time in it (a model re-exported to the same folder re-embeds)."""
    folder = Path(embedder_dir)
    newest = max((p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()), default=0)
    return f"{folder.resolve()}|{dtype}|{newest}"


def auth_token(env_name: str | None) -> SecretStr | None:
    """The bearer token from the environment variable `env_name`, read where the graph is built."""
    if env_name is None:
        return None
    token = os.environ.get(env_name, "")
    if not token.strip():
        raise RayFTError(f"serve.auth_token_env: environment variable {env_name} is not set or empty")
    return SecretStr(token)


def ingress_settings(cfg: JobConfig) -> IngressSettings:
    s = cfg.serve
    return IngressSettings(
        base_name=cfg.model.name, prompt=rag_prompt_of(cfg), top_k=s.top_k, max_tokens=s.max_tokens,
        max_tokens_limit=s.tokens_limit, request_timeout_s=s.request_timeout_s, retries=s.retries,
        max_input_chars=s.max_input_chars, max_embed_inputs=s.max_embed_inputs,
        max_request_bytes=s.max_request_bytes, auth_token=auth_token(s.auth_token_env),
        rerank_candidates=s.rerank.candidates if s.rerank.enabled else None,
        max_rerank_documents=s.rerank.max_documents,
    )


def engine_deployment_name(served_name: str) -> str:
    """The Serve deployment of a whole model's own engine (deployment names allow fewer characters)."""
    return "GeneratorDeployment_" + re.sub(r"[^A-Za-z0-9_.-]", "_", served_name)


def build_rag_app(cfg: JobConfig, model_dir: str, embedder_dir: str, adapters: dict[str, str],
                  documents: list[dict], whole_models: dict[str, str] | None = None,
                  reranker_dir: str | None = None):
    """The bound Serve application for `cfg` (deploy it with `serve.run`): the base engine with
    `adapters` {served name: location}, one more engine per entry of `whole_models`
    {served name: model folder}, and with `reranker_dir` (serve.rerank) a reranker between the
    retriever and the generator."""
    s, d = cfg.serve, cfg.serve.deployments
    whole_models = whole_models or {}
    names = [engine_deployment_name(n) for n in whole_models]
    if len(set(names)) < len(names):
        raise RayFTError(f"serve.models: names {sorted(whole_models)} collide as deployment names {names}")
    # First: a missing auth token fails before anything starts.
    settings = replace(ingress_settings(cfg), model_names=(cfg.model.name, *adapters, *whole_models))
    embedder = EmbedderDeployment.options(
        ray_actor_options={"num_cpus": s.embedder_cpus}, user_config=s.embedder_batching.model_dump(),
        **d.embedder.serve_options(),
    ).bind(embedder_dir, s.embedder_threads, s.embedder_dtype)
    retriever = RetrieverDeployment.options(
        ray_actor_options={"num_cpus": 0.1}, **d.retriever.serve_options(),
    ).bind(documents, cfg.data.node_groups[s.node_group], embedder, s.request_timeout_s, s.retries,
           s.retrieval_for(cfg.data.language).model_dump(),
           str(inside(cfg.run_dir / "serve_index", s.node_group)) if s.retrieval.persist_index else None,
           embedder_identity(embedder_dir, s.embedder_dtype))

    def engine(name: str | None, folder: str, served: str, engine_adapters: dict[str, str]):
        # Each engine holds its own weights and KV cache: one GPU each with serve.use_gpu.
        return GeneratorDeployment.options(
            **({"name": name} if name else {}),
            ray_actor_options={"num_cpus": s.generator_cpus, "num_gpus": 1 if cfg.serve_on_gpu else 0},
            **d.generator.serve_options(),
        ).bind(model_dir=folder, base_name=served, adapters=engine_adapters, vcfg=s.vllm,
               system_prompt=s.system_prompt or cfg.model.system_prompt, use_gpu=cfg.serve_on_gpu)

    generator = engine(None, model_dir, cfg.model.name, adapters)
    engines = {served: engine(name, folder, served, {})
               for name, (served, folder) in zip(names, whole_models.items())}
    reranker = None
    if reranker_dir is not None:
        r = s.rerank
        reranker = RerankerDeployment.options(
            ray_actor_options={"num_cpus": r.cpus}, **d.reranker.serve_options(),
        ).bind(reranker_dir, r.threads, r.dtype, r.max_len, r.max_batch_size, r.batch_wait_timeout_s)
    ingress = RAGIngress.options(ray_actor_options={"num_cpus": 0.1}, **d.ingress.serve_options())
    return ingress.bind(generator, retriever, embedder, settings, engines, reranker)


def deploy(cfg: JobConfig, model_dir: str, embedder_dir: str, adapters: dict[str, str],
           documents: list[dict], whole_models: dict[str, str] | None = None,
           take_over: bool = True, reranker_dir: str | None = None) -> str:
    """Start Serve on `serve.http_host:http_port`, deploy the graph, build the index; return the
    URL to reach it from this machine. `take_over=False`: refuse when a ray_ft app already runs on
    the cluster (an evaluation must not take down a live deployment)."""
    if not take_over and APP_NAME in _running_apps():
        raise RayFTError(f"a '{APP_NAME}' Serve app is already running on this cluster (ray.address="
                         f"{cfg.ray.address}): stop it, or evaluate on another cluster")
    serve.start(proxy_location=cfg.serve.proxy_location,
                http_options={"host": cfg.serve.http_host, "port": cfg.serve.http_port})
    serve.run(build_rag_app(cfg, model_dir, embedder_dir, adapters, documents, whole_models, reranker_dir),
              name=APP_NAME, route_prefix="/", blocking=False,
              logging_config=LoggingConfig(enable_access_log=False))  # one line per call is noise
    # Embed the knowledge base now, so the first request does not pay for it.
    retriever = serve.get_deployment_handle("RetrieverDeployment", app_name=APP_NAME)
    retriever.ready.remote().result(timeout_s=600)
    host = "127.0.0.1" if cfg.serve.http_host in ("0.0.0.0", "::") else cfg.serve.http_host
    return f"http://{host}:{cfg.serve.http_port}"


def _running_apps() -> set[str]:
    """Serve apps on the connected cluster (none when Serve has not been started there)."""
    return set(serve.status().applications)


def stop_serving(cfg: JobConfig) -> None:
    """Delete ray_ft's app, letting its replicas drain the requests they hold (measured:
    serve.shutdown() alone cut a streamed answer in flight); shut Serve down only on the local
    cluster this process started, never on a shared one where other apps may run."""
    serve.delete(APP_NAME)
    if not cfg.ray.address:
        serve.shutdown()
