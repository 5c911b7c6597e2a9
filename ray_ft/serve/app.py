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

import logging
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

from ray_ft.config import EmbedderBatching, JobConfig
from ray_ft.errors import RayFTError
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.serve.engines import VLLMGenerator
from ray_ft.serve.ingress import IngressSettings, LiveAdapterSettings, RAGService, build_api
from ray_ft.serve.prompting import rag_prompt_of
from ray_ft.serve.retriever import RetrieverDeployment

log = logging.getLogger("ray_ft.serve")


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
@serve.ingress()
class RAGIngress:
    def __init__(self, generator: DeploymentHandle, retriever: DeploymentHandle,
                 embedder: DeploymentHandle, settings: IngressSettings,
                 engines: dict[str, DeploymentHandle] | None = None, reranker: DeploymentHandle | None = None):
        self.service = RAGService(generator, retriever, embedder, settings, engines, reranker)

    def __serve_build_asgi_app__(self):
        # Built in the replica, around this replica's service (and its handles).
        return build_api(self.service)


def live_adapter_settings(cfg: JobConfig, model_dir: str, fixed: tuple[str, ...]) -> LiveAdapterSettings | None:
    """Where live adapters are registered and from where they may come (serve.live_adapters)."""
    a = cfg.serve.live_adapters
    if not a.enabled:
        return None
    registry = Path(a.registry) if a.registry else cfg.run_dir / "serve" / "adapters.json"
    return LiveAdapterSettings(str(registry.resolve()), tuple(str(Path(r).resolve()) for r in a.allowed_roots),
                               tuple(a.allowed_schemes), str(Path(model_dir).resolve()), cfg.serve.vllm.max_lora_rank,
                               fixed)


def knowledge_base_spec(cfg: JobConfig, embedder_dir: str) -> dict:
    """What a retriever replica needs to open the job's LanceDB table with the served embedder."""
    from ray_ft.kb.build import job_table
    from ray_ft.kb.store import embedder_fingerprint

    uri, table = job_table(cfg)
    return {"uri": uri, "table": table, "fingerprint": embedder_fingerprint(embedder_dir, cfg.serve.embedder_dtype),
            "cfg": cfg.serve.knowledge_base.model_dump(), "language": cfg.data.language}


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
                  whole_models: dict[str, str] | None = None, reranker_dir: str | None = None):
    """The bound Serve application for `cfg` (deploy it with `serve.run`; the job's knowledge-base
    table must be built: `deploy` does it): the base engine with `adapters` {served name:
    location}, one more engine per entry of `whole_models` {served name: model folder}, and with
    `reranker_dir` (serve.rerank) a reranker between the retriever and the generator."""
    s, d = cfg.serve, cfg.serve.deployments
    whole_models = whole_models or {}
    names = [engine_deployment_name(n) for n in whole_models]
    if len(set(names)) < len(names):
        raise RayFTError(f"serve.models: names {sorted(whole_models)} collide as deployment names {names}")
    # First: a missing auth token fails before anything starts.
    settings = replace(ingress_settings(cfg), model_names=(cfg.model.name, *adapters, *whole_models),
                       live_adapters=live_adapter_settings(cfg, model_dir, (cfg.model.name, *adapters, *whole_models)))
    registry = settings.live_adapters.registry if settings.live_adapters else None
    embedder = EmbedderDeployment.options(
        ray_actor_options={"num_cpus": s.embedder_cpus}, user_config=s.embedder_batching.model_dump(),
        **d.embedder.serve_options(),
    ).bind(embedder_dir, s.embedder_threads, s.embedder_dtype)
    retriever = RetrieverDeployment.options(
        ray_actor_options={"num_cpus": 0.1}, **d.retriever.serve_options(),
    ).bind(knowledge_base_spec(cfg, embedder_dir), cfg.data.node_groups[s.node_group], embedder,
           s.request_timeout_s, s.retries, s.retrieval_for(cfg.data.language).model_dump())

    def engine(name: str | None, folder: str, served: str, engine_adapters: dict[str, str], live: str | None = None):
        # Each engine holds its own weights and KV cache: one GPU each with serve.use_gpu.
        return GeneratorDeployment.options(
            **({"name": name} if name else {}),
            ray_actor_options={"num_cpus": s.generator_cpus, "num_gpus": 1 if cfg.serve_on_gpu else 0},
            **d.generator.serve_options(),
        ).bind(model_dir=folder, base_name=served, adapters=engine_adapters, vcfg=s.vllm,
               system_prompt=s.system_prompt or cfg.model.system_prompt, use_gpu=cfg.serve_on_gpu,
               registry=live, live_max_loras=s.live_adapters.max_loras)

    generator = engine(None, model_dir, cfg.model.name, adapters, registry)  # live adapters ride on the base
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


def app_name(cfg: JobConfig) -> str:
    """The job's Serve app: named after the job (a safe name), so jobs share a cluster."""
    return cfg.name


def deploy(cfg: JobConfig, model_dir: str, embedder_dir: str, adapters: dict[str, str],
           documents: list[dict], whole_models: dict[str, str] | None = None,
           take_over: bool = True, reranker_dir: str | None = None) -> str:
    """Bring the knowledge-base table to `documents` (Ray Data; embeds only what changed), start
    Serve on `serve.http_host:http_port` (or join the Serve a job before started on the cluster),
    deploy the graph as the app `cfg.name` under `serve.route_prefix`; return the URL to reach it
    from this machine. `take_over=False`: refuse when this job's app already runs (an evaluation
    must not take down a live deployment); `take_over=True` replaces it."""
    _check_cluster_room(cfg, take_over)
    from ray_ft.kb.build import build_job_knowledge_base

    built = build_job_knowledge_base(cfg, documents, embedder_dir)  # on the cluster, before any replica opens it
    log.info("knowledge base %s/%s: %d nodes (%d embedded, %d removed), version %d, indexes %s, %.1f s",
             built.uri, built.table, built.rows, built.embedded, built.removed, built.version,
             ", ".join(built.indexes) or "none", built.seconds)
    serve.start(proxy_location=cfg.serve.proxy_location,
                http_options={"host": cfg.serve.http_host, "port": cfg.serve.http_port})
    name = app_name(cfg)
    serve.run(build_rag_app(cfg, model_dir, embedder_dir, adapters, whole_models, reranker_dir),
              name=name, route_prefix=cfg.serve.route_prefix, blocking=False,
              logging_config=LoggingConfig(enable_access_log=False))  # one line per call is noise
    # Open the table in the retriever replicas now, so the first request does not pay for it.
    retriever = serve.get_deployment_handle("RetrieverDeployment", app_name=name)
    retriever.ready.remote().result(timeout_s=600)
    host = "127.0.0.1" if cfg.serve.http_host in ("0.0.0.0", "::") else cfg.serve.http_host
    return f"http://{host}:{cfg.serve.http_port}{cfg.serve.route_prefix.rstrip('/')}"


def _check_cluster_room(cfg: JobConfig, take_over: bool) -> None:
    """Refuse, before anything is built, a deployment the Serve already on the cluster cannot take:
    this job's app live and take_over=False, another app on the job's route prefix, or Serve
    listening on another port (serve.start would ignore ours and the URL would be wrong)."""
    details = _serve_details()
    if details is None:
        return
    where = f"on this cluster (ray.address={cfg.ray.address or 'local'})"
    name, prefix = app_name(cfg), cfg.serve.route_prefix
    apps = {n: a for n, a in details.applications.items() if a.status != "DELETING"}
    if not take_over and name in apps:
        raise RayFTError(f"the Serve app '{name}' is already running {where}: stop it, or evaluate "
                         "on another cluster")
    holder = next((n for n, a in apps.items() if a.route_prefix == prefix and n != name), None)
    if holder is not None:
        raise RayFTError(f"serve.route_prefix={prefix!r} is used by the Serve app '{holder}' {where}: "
                         "give this job another serve.route_prefix (e.g. /" + name + ")")
    port = details.http_options.port if details.http_options else None
    if port is not None and port != cfg.serve.http_port:
        raise RayFTError(f"serve.http_port={cfg.serve.http_port}, but Serve {where} listens on {port}: "
                         f"set serve.http_port: {port}")


def _serve_details():
    """Serve's instance details on the connected cluster (ray.serve.schema.ServeInstanceDetails,
    what `serve status` and the dashboard show), or None when Serve has not been started there."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeInstanceDetails

    client = _get_global_client(raise_if_no_controller_running=False)
    return None if client is None else ServeInstanceDetails(**client.get_serve_details())


def stop_serving(cfg: JobConfig) -> None:
    """Delete the job's app, letting its replicas drain the requests they hold (measured:
    serve.shutdown() alone cut a streamed answer in flight); shut Serve down only on the local
    cluster this process started and only once no other job's app is left on it; never on a shared
    cluster."""
    serve.delete(app_name(cfg))
    if not cfg.ray.address and not serve.status().applications:
        serve.shutdown()
