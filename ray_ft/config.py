"""The one typed config tree of a ray_ft job.

A YAML job file mirrors `JobConfig` one to one. Unknown keys and bad values are rejected on load
with the dotted field path in a one-line message; combinations that cannot work are checked too.
Library code receives these objects, never raw dicts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ray_ft.errors import RayFTError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    name: str = Field(
        "SmolLM2-135M-Instruct",
        description="Packaged model name (see `ray-ft models list`), a Hugging Face id, or a local "
        "Hugging Face folder.",
    )
    system_prompt: str = Field(
        "You are a helpful assistant.",
        description="System message that replaces the chat template's built-in one, in training "
        "and serving alike.",
    )


class DataConfig(_Strict):
    source: str = Field(
        "../shared/datasets/cmrc2018/cmrc2018_dev.json",
        description="SQuAD-style JSON file (relative paths resolve against the job file's folder, "
        "then the working directory), or `hf://NAME[:SPLIT]` for a Hugging Face dataset.",
    )
    language: Literal["zh", "en"] = Field("zh", description="Which prompt template to use.")
    val_size: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Share of passages held out for evaluation; the split is by passage, so no "
        "passage is in both halves.",
    )
    max_samples: int | None = Field(
        64, gt=0, description="At most this many training examples (None: all)."
    )
    cutoff_len: int = Field(
        2048, ge=32,
        description="Maximum tokens per training example; longer examples are dropped and counted "
        "(the answer is never cut).",
    )
    seed: int = Field(42, description="Seed of the passage split and of the sample selection.")
    num_shards: int = Field(2, ge=1, description="Parquet shards written for the training set.")
    packing: bool = Field(
        False, description="Pack several examples into each training row of up to cutoff_len tokens; "
        "position ids restart per example, so attention never crosses examples.",
    )
    dev_size: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="Share of the training passages held out as the validation set used during "
        "training (0: none). Split by passage, apart from the eval set.",
    )


class DeepSpeedConfig(_Strict):
    """DeepSpeed ZeRO for `task: sft` (CPU accelerator + gloo without a GPU, NCCL on GPUs)."""

    stage: Literal[0, 2, 3] = Field(
        0, description="ZeRO stage: 0 = plain DDP (no DeepSpeed), 2 = shard optimizer state and "
        "gradients, 3 = also shard the parameters.",
    )
    offload_optimizer: bool = Field(False, description="Keep optimizer state in CPU memory (ZeRO-Offload).")
    overrides: dict[str, Any] = Field(
        {}, description="Merged (recursively) over the generated DeepSpeed config, e.g. "
        "{zero_optimization: {overlap_comm: true}}. Batch size, accumulation, clipping and "
        "precision keys are owned by `train.*` and may not be overridden.",
    )

    @model_validator(mode="after")
    def _check_overrides(self) -> "DeepSpeedConfig":
        owned = sorted(set(self.overrides) & DEEPSPEED_OWNED_KEYS)
        if owned:
            raise ValueError(f"overrides may not set {owned}: they come from train.* fields")
        return self


DEEPSPEED_OWNED_KEYS = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
    "gradient_clipping", "bf16", "fp16", "optimizer", "scheduler",
}


class TrainConfig(_Strict):
    finetuning_type: Literal["lora", "freeze", "full"] = Field(
        "lora", description="lora: train a peft adapter; freeze: train only the top "
        "`freeze_trainable_layers` decoder layers; full: train every weight.",
    )
    learning_rate: float = Field(3e-4, gt=0.0, description="Peak AdamW learning rate.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the training set.")
    max_steps: int | None = Field(
        None, gt=0, description="Stop after this many optimizer steps (overrides epochs)."
    )
    per_device_train_batch_size: int = Field(1, ge=1, description="Rows (examples, or packed rows) per worker per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    lr_scheduler_type: Literal["cosine", "linear", "constant"] = Field(
        "cosine", description="Learning-rate decay after warm-up."
    )
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0, description="Linear warm-up share of steps.")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay.")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping norm.")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r.")
    lora_alpha: int = Field(16, ge=1, description="LoRA alpha (scale = alpha / r).")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str = Field(
        "all",
        description='"all" for every linear layer except the output head, or a comma-separated '
        "list of module names (e.g. q_proj,v_proj).",
    )
    freeze_trainable_layers: int = Field(
        2, ge=1, description="freeze: how many of the last decoder layers are trained."
    )
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description='"auto": bf16 on GPU, fp32 on CPU. bf16 runs the model in bfloat16 '
        "(DeepSpeed: bf16 mixed precision with fp32 master weights).",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data-parallel ranks).")
    use_gpu: bool = Field(False, description="One GPU per worker; CPU (gloo) otherwise.")
    cpus_per_worker: float = Field(2, gt=0, description="Logical CPUs (and torch threads) per worker.")
    seed: int = Field(42, description="Seed of the adapter init and of dropout.")
    log_every_n_steps: int = Field(1, ge=1, description="How often a metrics line is printed.")
    eval_every_n_steps: int | None = Field(
        None, ge=1, description="Validate and checkpoint every n optimizer steps (and always at the end).",
    )
    val_max_examples: int = Field(64, ge=1, description="Validation rows scored for the validation loss.")
    val_generate_samples: int = Field(
        16, ge=0, description="Validation questions answered greedily for exact match / origin (0: none).",
    )
    val_max_new_tokens: int = Field(32, ge=1, description="Token limit of those validation answers.")
    metric_for_best: Literal["val_loss", "val_exact_match", "val_origin", "val_f1"] = Field(
        "val_loss", description="Which validation number picks the exported checkpoint "
        "(loss: lowest; the others: highest).",
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept, the best by metric_for_best first.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a better metric_for_best.",
    )
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the latest checkpoint.")
    storage_path: str | None = Field(
        None, description="Where Ray Train keeps checkpoints: a local folder or s3://, gs:// URI "
        "(None: the run folder's train/ray).",
    )
    export_merged: bool = Field(
        False, description="lora: also write train/merged, the base with the adapter merged in "
        "(safetensors), for engines that cannot load adapters.",
    )
    tensorboard: bool = Field(True, description="Write TensorBoard event files to train/tensorboard.")

    @model_validator(mode="after")
    def _check_combinations(self) -> "TrainConfig":
        if self.early_stopping_patience and not self.eval_every_n_steps:
            raise ValueError("early_stopping_patience needs eval_every_n_steps")
        if self.metric_for_best != "val_loss" and self.val_generate_samples == 0:
            raise ValueError(f"metric_for_best={self.metric_for_best} needs val_generate_samples > 0")
        if self.export_merged and self.finetuning_type != "lora":
            raise ValueError("export_merged applies to lora only (freeze/full export a whole model)")
        return self


class EmbedConfig(_Strict):
    """Contrastive fine-tuning of the embedder (`task: embedding`), FlagEmbedding's recipe."""

    model: str = Field("all-MiniLM-L6-v2", description="Sentence-transformers model to fine-tune.")
    source: str = Field(
        "../../shared/datasets/financial-qa-10k/financial_qa_10k.csv",
        description="CSV with question and context columns, or a FlagEmbedding triplet .jsonl "
        "(relative paths: against the job file).",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A row with an empty question/context: stop with its line, or skip and count."
    )
    test_size: float = Field(0.1, gt=0.0, lt=1.0, description="Share of contexts held out for retrieval eval.")
    seed: int = Field(
        1314, description="Seed of the split, the negatives and the (shuffled, then fixed) training order."
    )
    neg_num: int = Field(10, ge=1, description="Random negatives stored per query (never its own context).")
    train_group_size: int = Field(
        4, ge=2, description="Passages per query in a step: 1 positive + (n-1) of its negatives."
    )
    query_instruction: str = Field(
        "Represent this sentence for searching relevant passages: ",
        description="Prefix of every query, in training and in retrieval.",
    )
    query_max_len: int = Field(64, ge=8, description="Query tokens kept.")
    passage_max_len: int = Field(256, ge=8, description="Passage tokens kept.")
    pooling: Literal["mean", "cls"] = Field("mean", description="Sentence vector: mean of tokens or [CLS].")
    temperature: float = Field(0.02, gt=0.0, description="InfoNCE temperature.")
    negatives_cross_device: bool = Field(True, description="Passages of all workers are negatives too.")
    grad_cache_chunk_size: int | None = Field(
        None, ge=1, description="GradCache: embed in chunks of this many texts (None: whole batch at once)."
    )
    learning_rate: float = Field(2e-5, gt=0.0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Linear warm-up share of steps.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the training triplets.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (overrides epochs).")
    per_device_batch_size: int = Field(32, ge=1, description="Queries per worker per step.")
    max_train_samples: int | None = Field(None, ge=1, description="Use only the first n triplets (seeded).")
    val_size: float = Field(
        0.05, ge=0.0, lt=0.5,
        description="Share of the training contexts held out for validation during training (0: none).",
    )
    val_max_queries: int = Field(300, ge=1, description="Validation questions scored at each evaluation.")
    eval_every_n_steps: int | None = Field(
        None, ge=1, description="Validate + checkpoint every n steps (always at the end)."
    )
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept, best validation MRR first.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the latest checkpoint.")
    eval_top_k: int = Field(10, ge=1, description="Passages retrieved per test query (MRR@k, nDCG@k).")
    sentence_splitter: str = Field(
        ".", min_length=1, description='Cuts passages into sentences for context relevance ("。" for Chinese).'
    )
    recall_threshold: float = Field(
        0.5, gt=0.0, le=1.0, description="Levenshtein similarity at which a context counts as recalled."
    )
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(2, gt=0, description="Logical CPUs (and torch threads) per worker.")


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


class ServeConfig(_Strict):
    embedder: str = Field(
        "all-MiniLM-L6-v2", description="Embedding model (packaged name, HF id or local folder)."
    )
    knowledge_base: Literal["eval_passages"] = Field(
        "eval_passages", description="Documents the retriever indexes: the held-out passages."
    )
    node_group: Literal["passage", "line"] = Field(
        "passage", description="One retrieval node per passage or per non-empty line."
    )
    top_k: int = Field(1, ge=1, le=20, description="Passages retrieved per question.")
    max_tokens: int = Field(48, ge=1, description="Default completion length.")
    http_port: int = Field(8000, ge=1, le=65535, description="Ray Serve HTTP port.")
    generator_cpus: float = Field(1.0, ge=0, description="Logical CPUs reserved for the generator.")
    embedder_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved for the embedder.")
    embedder_threads: int = Field(
        0, ge=0, description="Torch threads of the embedder replica; 0 = all the node's cores (Ray "
        "would give a 0.5-CPU actor one thread, halving batch throughput on 2 cores).",
    )
    vllm: VLLMConfig = Field(default_factory=VLLMConfig)


class EndpointConfig(_Strict):
    label: str = Field(..., min_length=1, description="Name of this model in the report.")
    base_url: str = Field(
        ..., pattern=r"^https?://",
        description="OpenAI-compatible API root, ending in /v1 (e.g. http://host:8000/v1).",
    )
    model: str = Field(..., min_length=1, description="The `model` field sent to the endpoint.")
    api_key_env: str | None = Field(
        None, description="Environment variable holding the bearer token (never put the key here)."
    )


class JudgeConfig(_Strict):
    enabled: bool = Field(False, description="Score answer relevance and faithfulness with an LLM judge.")
    model: str = Field(
        "base", description='Who judges: "base", "finetuned" or the label of an `eval.endpoints` entry.'
    )
    max_samples: int = Field(20, ge=1, description="Questions judged per model and mode (the first n).")
    n_questions: int = Field(3, ge=1, le=10, description="Questions generated per answer (relevance).")
    max_retries: int = Field(2, ge=0, le=5, description="Re-asks after a malformed JSON reply.")


class EvalConfig(_Strict):
    max_samples: int = Field(50, ge=1, description="Held-out questions to evaluate.")
    modes: list[Literal["gold", "retrieved"]] = Field(
        ["gold", "retrieved"], min_length=1,
        description='"gold": the question\'s own passage (the 100%-recall control); '
        '"retrieved": top-k passages from the served retriever.',
    )
    models: list[Literal["base", "finetuned"]] = Field(
        ["base", "finetuned"], min_length=1, description="Which served models to compare."
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight (lets vLLM batch).")
    endpoints: list[EndpointConfig] = Field(
        [], description="Other OpenAI-compatible models compared side by side (same prompts, same contexts)."
    )
    adapters: dict[str, str] = Field(
        {}, description="More LoRA adapters served on the same base and compared: {label: folder}."
    )
    adapter: str | None = Field(
        None, description='Adapter folder evaluated as "finetuned" by `ray-ft eval` '
        "(default: the run's train/adapter; relative to the working directory).",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    plots: bool = Field(True, description="Write metrics.png (and loss.png after training).")

    @model_validator(mode="after")
    def _check_labels(self) -> "EvalConfig":
        labels = [*self.models, *self.adapters, *(e.label for e in self.endpoints)]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"model labels must be unique; repeated: {dupes}")
        if self.judge.enabled and self.judge.model not in labels:
            raise ValueError(f"judge.model '{self.judge.model}' is not one of the compared models {labels}")
        return self


class RayConfig(_Strict):
    address: str | None = Field(
        None, description='Cluster to join ("auto" inside `ray job submit`); None starts a local one.'
    )
    num_cpus: int | None = Field(
        None, ge=1, description="Logical CPUs of a local cluster (None: max(4, the machine's cores))."
    )
    include_dashboard: bool = Field(
        True,
        description="Start the dashboard with a local cluster; Ray Train's State-API checks need it "
        "(without it they log a warning every few seconds).",
    )


class JobConfig(_Strict):
    name: str = Field(..., min_length=1, description="Job name; also the run folder's name.")
    task: Literal["sft", "embedding"] = Field(
        "sft", description="What `ray-ft train` fine-tunes: the LLM (sft) or the embedder (embedding)."
    )
    output_dir: str = Field(
        "runs", description="Parent folder of the run folder (relative to the working directory)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)

    @model_validator(mode="after")
    def _check_combinations(self) -> "JobConfig":
        if self.train.lora_rank > self.serve.vllm.max_lora_rank:
            raise ValueError(
                f"train.lora_rank={self.train.lora_rank} exceeds serve.vllm.max_lora_rank="
                f"{self.serve.vllm.max_lora_rank}: the engine could not load the adapter"
            )
        if self.data.cutoff_len + self.serve.max_tokens > self.serve.vllm.max_model_len:
            raise ValueError(
                f"data.cutoff_len + serve.max_tokens ({self.data.cutoff_len}+{self.serve.max_tokens}) "
                f"exceeds serve.vllm.max_model_len={self.serve.vllm.max_model_len}"
            )
        taken = {self.name, self.model.name} & set(self.eval.adapters)
        if taken:
            raise ValueError(f"eval.adapters label {sorted(taken)} is already the served name of the "
                             "fine-tuned adapter (job name) or of the base model")
        if self.data.num_shards < self.train.num_workers:
            raise ValueError(
                f"data.num_shards={self.data.num_shards} < train.num_workers="
                f"{self.train.num_workers}: some workers would get no data"
            )
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field '{path}': {msg}{more}"


def parse_job(data: object, source: str = "<job>", base_dir: Path | None = None) -> JobConfig:
    """Validate a parsed YAML/dict into a JobConfig; relative data paths resolve against base_dir."""
    if not isinstance(data, dict):
        raise RayFTError(f"{source}: the job file must be a YAML mapping, got {type(data).__name__}")
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as err:
        raise RayFTError(_format_validation_error(source, err)) from None
    if base_dir is not None:
        cfg = _resolve_source(cfg, base_dir)
    return cfg


def _resolve_path(src: str, base_dir: Path) -> str:
    if "://" in src or Path(src).is_absolute():
        return src
    candidate = (base_dir / src).resolve()
    if not candidate.exists() and Path(src).exists():
        candidate = Path(src).resolve()
    return str(candidate)


def _resolve_source(cfg: JobConfig, base_dir: Path) -> JobConfig:
    data = cfg.data.model_copy(update={"source": _resolve_path(cfg.data.source, base_dir)})
    embed = cfg.embed.model_copy(update={"source": _resolve_path(cfg.embed.source, base_dir)})
    return cfg.model_copy(update={"data": data, "embed": embed})


def load_job(path: str | Path) -> JobConfig:
    """Load and validate a YAML job file."""
    path = Path(path)
    if not path.is_file():
        raise RayFTError(f"{path}: job file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RayFTError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    return parse_job(data, source=str(path), base_dir=path.resolve().parent)
