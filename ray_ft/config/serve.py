"""`serve.*`: the RAG graph on Ray Serve (engine, deployments, batching, retrieval, limits)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_ft.config.base import _Strict, safe_keys
from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.config.live_adapters import LiveAdaptersConfig
from ray_ft.config.rerank import ServeRerankSettings
from ray_ft.paths import NAME_PATTERN, name_problem


class VLLMConfig(_Strict):
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description='"auto": bfloat16 on GPU and on CPUs with native bf16 (AVX512-BF16/AMX), '
        "float32 on other CPUs.",
    )
    max_model_len: int = Field(4096, ge=64, description="Longest prompt + completion in tokens.")
    kv_cache_space_gb: int = Field(
        1, ge=1, description="CPU only: KV-cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE)."
    )
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1.0, description="GPU only.")
    enforce_eager: bool = Field(
        True, description="Skip torch.compile/CUDA graphs: ~15 s start instead of minutes on CPU."
    )
    max_lora_rank: int = Field(16, ge=1, description="Largest adapter rank the engine accepts.")
    max_num_seqs: int = Field(16, ge=1, description="Sequences batched together by the engine.")


class AutoscalingSettings(_Strict):
    """Ray Serve autoscaling of one deployment (its `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (0 lets an idle deployment scale to zero).")
    max_replicas: int = Field(2, ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas started at deploy time (None: min_replicas)."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="Requests in flight per replica that the autoscaler aims for."
    )
    upscale_delay_s: float = Field(30.0, ge=0, description="How long load must stay high before scaling up.")
    downscale_delay_s: float = Field(600.0, ge=0, description="How long load must stay low before scaling down.")
    look_back_period_s: float = Field(
        30.0, gt=0, description="Window over which ongoing requests are averaged for a decision."
    )

    @model_validator(mode="after")
    def _check_range(self) -> "AutoscalingSettings":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas={self.min_replicas} > max_replicas={self.max_replicas}")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError(f"initial_replicas={self.initial_replicas} is outside "
                             f"[min_replicas, max_replicas] = [{self.min_replicas}, {self.max_replicas}]")
        return self


class DeploymentSettings(_Strict):
    """Replicas, admission, health checks and shutdown of one Serve deployment."""

    num_replicas: int | None = Field(
        None, ge=1, description="Fixed replica count (None: 1, or the autoscaler's choice when "
        "`autoscaling` is set; give one or the other).",
    )
    autoscaling: AutoscalingSettings | None = Field(
        None, description="Scale between min and max replicas on ongoing requests (None: fixed)."
    )
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests one replica takes at once; more wait in the caller's queue."
    )
    health_check_period_s: float = Field(10.0, gt=0, description="Seconds between health checks of a replica.")
    health_check_timeout_s: float = Field(
        30.0, gt=0, description="A health check slower than this fails; a failing replica is replaced."
    )
    graceful_shutdown_timeout_s: float = Field(
        20.0, ge=0, description="On shutdown or downscaling, how long a replica may finish its "
        "in-flight requests before it is killed.",
    )

    @model_validator(mode="after")
    def _check_replicas(self) -> "DeploymentSettings":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set num_replicas or autoscaling, not both")
        a = self.autoscaling
        if a is not None and a.target_ongoing_requests > self.max_ongoing_requests:
            raise ValueError(f"autoscaling.target_ongoing_requests={a.target_ongoing_requests:g} exceeds "
                             f"max_ongoing_requests={self.max_ongoing_requests}: the target could never be reached")
        return self

    def serve_options(self) -> dict:
        """Keyword arguments of `Deployment.options` (Ray Serve's names)."""
        opts = {"max_ongoing_requests": self.max_ongoing_requests,
                "health_check_period_s": self.health_check_period_s,
                "health_check_timeout_s": self.health_check_timeout_s,
                "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s}
        if self.autoscaling is not None:
            opts["autoscaling_config"] = self.autoscaling.model_dump(exclude_none=True)
        else:
            opts["num_replicas"] = self.num_replicas or 1
        return opts


class IngressDeploymentSettings(DeploymentSettings):
    """The ingress only waits on the others, so one replica holds many more requests."""

    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one replica takes at once; more wait in the HTTP proxy."
    )


class ServeDeployments(_Strict):
    """Per-deployment settings of the RAG graph (defaults are per type, so a partial section
    keeps the other defaults)."""

    generator: DeploymentSettings = Field(
        default_factory=DeploymentSettings,
        description="The vLLM engine (base + adapters); a replica takes ~20-40 s to start on CPU.",
    )
    embedder: DeploymentSettings = Field(default_factory=DeploymentSettings, description="The embedding model.")
    reranker: DeploymentSettings = Field(
        default_factory=DeploymentSettings, description="The cross-encoder (with serve.rerank.enabled).")
    retriever: DeploymentSettings = Field(default_factory=DeploymentSettings, description="The vector index.")
    ingress: IngressDeploymentSettings = Field(
        default_factory=IngressDeploymentSettings,
        description="The FastAPI ingress (OpenAI-compatible API, /v1/rag).",
    )


class EmbedderBatching(_Strict):
    """Dynamic request batching of the embedder (`@serve.batch`)."""

    max_batch_size: int = Field(
        32, ge=1, description="Requests merged into one model call (1: no batching, one call per request)."
    )
    batch_wait_timeout_s: float = Field(
        0.005, ge=0.0, le=1.0, description="How long the first request of a batch waits for more to join."
    )


class RetrievalSettings(_Strict):
    """How the retriever ranks knowledge-base nodes."""

    mode: Literal["auto", "dense", "bm25", "hybrid"] = Field(
        "auto", description="dense: vector search of the knowledge-base table (exact below "
        "knowledge_base.ann_min_rows, an ANN index above); bm25: its full-text index (words; for CJK "
        "character unigrams + bigrams, knowledge_base.fts_tokenizer); hybrid: both, fused by "
        "reciprocal rank. auto: follows data.language, "
        "bm25 for zh (the packaged embedder is English-only: on CMRC2018 it finds the passage for "
        "18% of the questions, BM25 for 93%), dense for en.",
    )
    candidates: int = Field(50, ge=1, description="hybrid: nodes taken from each ranking before fusion.")
    rrf_k: int = Field(60, ge=1, description="hybrid: k of reciprocal-rank fusion, score = sum 1 / (k + rank).")
    query_instruction: str = Field(
        "", description="Prefix of each query when it is embedded (the instruction the embedder was "
        "fine-tuned with; embed.enabled sets it unless given). BM25 sees the bare query.",
    )


class ServeConfig(_Strict):
    embedder: str = Field(
        "all-MiniLM-L6-v2", description="Embedding model (packaged name, HF id or local folder)."
    )
    node_group: str = Field(
        "passage", description="Which of `data.node_groups` the retriever indexes (passage, line, "
        "sentence, chunk by default).",
    )
    top_k: int = Field(1, ge=1, le=20, description="Passages retrieved per question.")
    models: dict[str, str] = Field(
        default_factory=dict, description="Whole models served beside the base, each on a vLLM "
        "engine of its own: served name -> local folder (a merged export such as "
        "runs/NAME/train/merged, a full fine-tune), packaged name or HF id. Evaluated with the others "
        "by `ray-ft run`/`eval`. A freeze/full job's own trained model is added under the job's name.",
    )
    use_gpu: bool | None = Field(
        None, description="One GPU per vLLM engine (and for QA generation on Ray Data); None: as "
        "train.use_gpu.",
    )
    finetuned_adapter: Literal["auto", "unmerged", "merged"] = Field(
        "auto", description="How the job's fine-tuned LoRA adapter is served: unmerged on the base "
        "engine (vLLM LoRA; the base and every adapter share one engine) or merged into the base "
        "weights, as a whole model on an engine of its own (run_dir/serve/merged, re-merged when the "
        "adapter changes). auto: merged on CPU, where vLLM's LoRA kernels made an unmerged adapter "
        "2.5-6x slower than the base (bench/RESULTS.md), unmerged on GPU. eval.adapters stay unmerged.",
    )
    max_tokens: int = Field(48, ge=1, description="Default completion length.")
    http_port: int = Field(
        8000, ge=1, le=65535, description="Ray Serve HTTP port. One per cluster: the first job to "
        "start Serve sets it, and a job asking for another port on that cluster is refused.",
    )
    route_prefix: str = Field(
        "/", description="Path the job's endpoints live under (/: http://host:port/v1/...; /fin: "
        "http://host:port/fin/v1/...). The job's Serve app is named after the job, so several jobs "
        "serve on one cluster at once, each under a prefix of its own.",
    )
    generator_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved for the generator.")
    embedder_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved for the embedder.")
    embedder_threads: int = Field(
        0, ge=0, description="Torch threads of the embedder replica; 0 = all the node's cores (Ray "
        "would give a 0.5-CPU actor one thread, halving batch throughput on 2 cores).",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)
    # Operations of the serving graph (issue 6).
    http_host: str = Field(
        "127.0.0.1", description="Address the HTTP proxy binds (0.0.0.0: every interface; then set "
        "auth_token_env).",
    )
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="Where Serve runs HTTP proxies: on every node (Ray's default; a "
        "load balancer in front spreads clients) or on the head only (clients reach the head; "
        "autoscaled GPU nodes carry no proxy).",
    )
    embedder_dtype: Literal["float32", "bfloat16"] = Field(
        "float32", description="Precision of the served embedder. bfloat16 encodes a batch ~1.7x "
        "faster on CPUs with native bf16 (AVX512-BF16, measured in-process) but moves vectors by "
        "~1e-2, so eval cosines and retrieval scores differ a little from float32.",
    )
    deployments: ServeDeployments = Field(default_factory=ServeDeployments)
    embedder_batching: EmbedderBatching = Field(default_factory=EmbedderBatching)
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)
    rerank: ServeRerankSettings = Field(default_factory=ServeRerankSettings)
    knowledge_base: KnowledgeBaseConfig = Field(default_factory=KnowledgeBaseConfig)
    live_adapters: LiveAdaptersConfig = Field(default_factory=LiveAdaptersConfig)
    request_timeout_s: float = Field(
        300.0, gt=0, description="How long the ingress waits for the generator, retriever or "
        "embedder before answering 504 (and cancelling the call).",
    )
    retries: int = Field(
        2, ge=0, description="Re-sends of a call whose replica died before answering (a streamed "
        "answer only before its first chunk); Serve routes them to a live or replacement replica.",
    )
    max_tokens_limit: int | None = Field(
        None, ge=1, description="Largest max_tokens a request may ask for (None: vllm.max_model_len // 2)."
    )
    max_input_chars: int = Field(
        100_000, ge=1, description="Characters of text one request may carry (messages, query and "
        "contexts, or embedding inputs); more is a 400.",
    )
    max_embed_inputs: int = Field(256, ge=1, description="Texts one /v1/embeddings request may carry.")
    max_request_bytes: int = Field(
        4_000_000, ge=1024, description="Largest request body; more is a 413 before it is parsed."
    )
    auth_token_env: str | None = Field(
        None, description="Environment variable holding the bearer token every endpoint but "
        "/healthz requires (None: no auth). Read when the graph is built; never logged.",
    )
    system_prompt: str | None = Field(
        None, description="System message of /v1/rag prompts and of chats that bring none "
        "(None: model.system_prompt, as in training).",
    )
    prompt_template: str | None = Field(
        None, description="User turn of /v1/rag prompts with {context_str} (the retrieved passages, "
        "joined) and {query} (None: the training prompt of data.language, byte for byte).",
    )

    @field_validator("route_prefix")
    @classmethod
    def _check_route_prefix(cls, prefix: str) -> str:
        if prefix != "/" and not (prefix.startswith("/") and name_problem(prefix[1:]) is None):
            raise ValueError(f"route_prefix={prefix!r} must be '/' or '/' followed by one name "
                             f"({NAME_PATTERN}), e.g. /fin")
        return prefix

    @field_validator("models")
    @classmethod
    def _check_model_names(cls, models: dict[str, str]) -> dict[str, str]:
        return safe_keys(models)

    def retrieval_for(self, language: str) -> RetrievalSettings:
        """`retrieval` with an `auto` mode resolved for the job's data.language."""
        if self.retrieval.mode != "auto":
            return self.retrieval
        return self.retrieval.model_copy(update={"mode": "bm25" if language == "zh" else "dense"})

    @model_validator(mode="after")
    def _check_serving(self) -> "ServeConfig":
        if self.max_tokens > self.tokens_limit:
            raise ValueError(f"max_tokens={self.max_tokens} exceeds max_tokens_limit={self.tokens_limit}")
        if self.tokens_limit >= self.vllm.max_model_len:
            raise ValueError(f"max_tokens_limit={self.tokens_limit} leaves no room for a prompt in "
                             f"vllm.max_model_len={self.vllm.max_model_len}")
        if self.retrieval.mode == "hybrid" and self.retrieval.candidates < self.top_k:
            raise ValueError(f"retrieval.candidates={self.retrieval.candidates} < top_k={self.top_k}: "
                             "fusion could not fill top_k")
        if self.live_adapters.enabled and not self.auth_token_env:
            raise ValueError("live_adapters.enabled needs auth_token_env: registering adapters is never open")
        b, e = self.embedder_batching, self.deployments.embedder
        if b.max_batch_size > e.max_ongoing_requests:
            raise ValueError(f"embedder_batching.max_batch_size={b.max_batch_size} exceeds "
                             f"deployments.embedder.max_ongoing_requests={e.max_ongoing_requests}: a replica "
                             "never holds that many requests, so no batch could fill")
        if self.prompt_template is not None:
            from string import Formatter

            fields = {f for _, f, _, _ in Formatter().parse(self.prompt_template) if f is not None}
            if fields != {"context_str", "query"}:
                raise ValueError("prompt_template must use exactly {context_str} and {query}; it uses "
                                 f"{sorted(fields)}")
        return self

    @property
    def tokens_limit(self) -> int:
        """The effective max_tokens limit."""
        return self.max_tokens_limit or self.vllm.max_model_len // 2
