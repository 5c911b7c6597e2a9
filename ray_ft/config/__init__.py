"""The one typed config tree of a ray_ft job.

A YAML job file mirrors `JobConfig` one to one. Unknown keys and bad values are rejected on load
with the dotted field path in a one-line message; combinations that cannot work are checked too.
Library code receives these objects, never raw dicts. The sections live in submodules
(`data`, `train`, `serve`, `evaluation`); everything is importable from `ray_ft.config`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ray_ft.config.base import SafeName, _Strict
from ray_ft.config.data import DataConfig, NodeGroupConfig, RetrievalAugmentConfig
from ray_ft.config.lsr import LSRConfig
from ray_ft.config.overrides import apply_overrides, override_for
from ray_ft.config.tracking import MLflowConfig, TrackingConfig
from ray_ft.config.rerank import RerankConfig, ServeRerankSettings
from ray_ft.config.generation import QAEndpointConfig, QAFilterConfig, QAGenerationConfig
from ray_ft.config.evaluation import EndpointConfig, EvalConfig, JudgeConfig
from ray_ft.config.serve import (
    AutoscalingSettings, DeploymentSettings, EmbedderBatching, IngressDeploymentSettings,
    RetrievalSettings, ServeConfig, ServeDeployments, VLLMConfig,
)
from ray_ft.config.train import (
    DEEPSPEED_OWNED_KEYS, DeepSpeedConfig, EmbedConfig, HardNegativeConfig, TrainConfig,
)
from ray_ft.errors import RayFTError

__all__ = [
    "AutoscalingSettings", "DEEPSPEED_OWNED_KEYS", "DataConfig", "DeepSpeedConfig", "DeploymentSettings",
    "EmbedConfig", "EmbedderBatching", "EndpointConfig", "EvalConfig", "HardNegativeConfig", "LSRConfig",
    "IngressDeploymentSettings", "JobConfig", "JudgeConfig", "MLflowConfig", "TrackingConfig", "ModelConfig", "NodeGroupConfig", "QAEndpointConfig",
    "QAFilterConfig", "QAGenerationConfig", "RayConfig",
    "RerankConfig", "RetrievalAugmentConfig", "RetrievalSettings", "ServeRerankSettings", "ServeConfig", "ServeDeployments", "TrainConfig",
    "VLLMConfig", "load_job", "parse_job", "write_resolved",
]


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


class RequiredJob(_Strict):
    """A job `ray-ft run` runs to its end before this one (its stages skipped when unchanged)."""

    job: str = Field(..., description="The job file (relative to this job file's folder).")
    overrides: list[str] = Field(
        default_factory=list, description="`dotted.key=value` overrides for it, as on the command line.",
    )


class JobConfig(_Strict):
    name: SafeName = Field(..., description="Job name; also the run folder's name and the served name of the "
                           "fine-tuned model ([A-Za-z0-9][A-Za-z0-9._-]{0,127}, no '..').")
    task: Literal["sft", "embedding", "rerank"] = Field(
        "sft", description="What `ray-ft train` fine-tunes: the LLM (sft), the embedder (embedding) or the "
        "reranker (rerank)."
    )
    output_dir: str = Field(
        "runs", description="Parent folder of the run folder (relative to the working directory)."
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    rerank: RerankConfig = Field(default_factory=RerankConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    requires: list[RequiredJob] = Field(
        default_factory=list, description="Jobs `ray-ft run` runs first, in order (e.g. the SFT job whose "
        "mined pairs and merged model this preference job starts from).",
    )

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
        taken = {self.name, self.model.name, *self.eval.adapters} & set(self.serve.models)
        if taken:
            raise ValueError(f"serve.models name {sorted(taken)} is already the served name of the base "
                             "model, the fine-tuned model (job name) or an eval.adapters label")
        # serve.models are evaluated too: one report row per label, so labels never repeat.
        labels = [*self.eval.models, *self.eval.adapters, *self.serve.models, *(e.label for e in self.eval.endpoints)]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"serve.models name {dupes} repeats an eval label (eval.models, eval.adapters, "
                             "eval.endpoints): the report would merge two models")
        if self.data.num_shards is not None and self.data.num_shards < self.train.num_workers:
            raise ValueError(
                f"data.num_shards={self.data.num_shards} < train.num_workers="
                f"{self.train.num_workers}: some workers would get no data"
            )
        preference = self.train.is_preference
        if preference and self.train.preference.dev_size == 0:
            if self.train.metric_for_best != "val_loss" or self.train.early_stopping_patience:
                raise ValueError(f"train.metric_for_best={self.train.metric_for_best} / early_stopping_patience "
                                 "need dev pairs (train.preference.dev_size > 0)")
        if self.task == "sft" and not preference and self.data.dev_size == 0:
            if self.train.metric_for_best != "val_loss":
                raise ValueError(f"train.metric_for_best={self.train.metric_for_best} needs a dev split "
                                 "(data.dev_size > 0): validation answers come from it")
            if self.train.early_stopping_patience:
                raise ValueError("train.early_stopping_patience needs a dev split (data.dev_size > 0): "
                                 "without one there is no validation metric to stop on")
        if self.embed.enabled:
            self._check_finetuned_embedder_use()
            if self.data.documents:
                raise ValueError("embed.enabled with data.documents: the embedder's training pairs would "
                                 "have to come from the generated QA set, which is not wired yet; fine-tune "
                                 "the embedder in a task: embedding job on data/generated_qa.jsonl")
        if self.embed.lsr.enabled and not (self.task == "embedding" or self.embed.enabled):
            raise ValueError("embed.lsr.enabled runs in the embed stage: set task: embedding or embed.enabled")
        if "reranked" in self.eval.modes and not self.serve.rerank.enabled:
            raise ValueError("eval.modes 'reranked' needs a served reranker (serve.rerank.enabled)")
        if self.serve.rerank.enabled and self.serve.rerank.model is None and not self.trains_reranker:
            raise ValueError("serve.rerank.enabled: give serve.rerank.model, or set rerank.enabled to serve "
                             "the reranker this job trains")
        if self.serve.node_group not in self.data.node_groups:
            raise ValueError(f"serve.node_group '{self.serve.node_group}' is not one of data.node_groups "
                             f"{sorted(self.data.node_groups)}")
        return self

    def _check_finetuned_embedder_use(self) -> None:
        if self.task == "embedding":
            raise ValueError("embed.enabled is for task: sft (`ray-ft run` fine-tunes the embedder, then "
                             "the LLM); a task: embedding job fine-tunes the embedder already")
        own = self.finetuned_embedder_dir
        for name, section in (("serve.embedder", self.serve), ("data.retrieval_augment.embedder",
                                                                self.data.retrieval_augment)):
            if "embedder" in section.model_fields_set and section.embedder != own:
                raise ValueError(f"{name}={section.embedder}: with embed.enabled the job uses the embedder "
                                 f"it fine-tunes ({own}); remove {name}")

    @property
    def trains_reranker(self) -> bool:
        """The job has a `rerank` stage (task: rerank, or rerank.enabled)."""
        return self.task == "rerank" or self.rerank.enabled

    @property
    def finetuned_reranker_dir(self) -> str:
        """Where the rerank stage exports the trained cross-encoder."""
        return str(self.run_dir / "rerank" / "model")

    @property
    def served_reranker(self) -> str | None:
        """The cross-encoder the graph serves: serve.rerank.model, else the job's own; None: no reranking."""
        r = self.serve.rerank
        if not r.enabled:
            return None
        return r.model or self.finetuned_reranker_dir

    @property
    def finetuned_embedder_dir(self) -> str:
        """Where the embed stage exports the fine-tuned embedder (the LSR result with embed.lsr)."""
        if self.embed.lsr.enabled:
            return str(self.run_dir / "embed" / "lsr" / "model")
        return str(self.run_dir / "embed" / "model")

    @property
    def serve_on_gpu(self) -> bool:
        """vLLM engines (serving, QA generation) on GPUs: serve.use_gpu, else train.use_gpu."""
        return self.train.use_gpu if self.serve.use_gpu is None else self.serve.use_gpu

    @property
    def num_shards(self) -> int:
        """Training shards: data.num_shards, else one per training worker."""
        return self.data.num_shards or self.train.num_workers

    @property
    def run_dir(self) -> Path:
        """output_dir/name; `name` is a SafeName, and the join is checked to stay in output_dir."""
        from ray_ft.paths import inside

        inside(self.output_dir, self.name)
        return Path(self.output_dir) / self.name


def _format_validation_error(source: str, err: ValidationError, overrides=()) -> str:
    first = err.errors()[0]
    path = ".".join(str(p) for p in first["loc"]) or "<root>"
    culprit = override_for(first["loc"], overrides) if first["loc"] else None
    if culprit is not None:
        source = f"{source}: override '{culprit}'"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    else:
        msg = first["msg"].removeprefix("Value error, ")
    more = f" (+{err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"{source}: field '{path}': {msg}{more}"


def parse_job(data: object, source: str = "<job>", base_dir: Path | None = None,
              overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Validate a parsed YAML/dict, with `overrides` (`dotted.key=value`) set on it, into a
    JobConfig; relative data paths resolve against base_dir."""
    if not isinstance(data, dict):
        raise RayFTError(f"{source}: the job file must be a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides)
    try:
        cfg = JobConfig.model_validate(data)
    except ValidationError as err:
        raise RayFTError(_format_validation_error(source, err, overrides)) from None
    if base_dir is not None:
        cfg = _resolve_source(cfg, base_dir)
    return _wire_finetuned_embedder(cfg)


def _wire_finetuned_embedder(cfg: JobConfig) -> JobConfig:
    """embed.enabled: serving and retrieval-augmented data use the embedder the job fine-tunes,
    with its query instruction unless one is given there."""
    if not cfg.embed.enabled:
        return cfg
    own, instruction = cfg.finetuned_embedder_dir, cfg.embed.query_instruction

    def wired(section, **fields):
        given = section.model_fields_set
        return section.model_copy(update={k: v for k, v in fields.items() if k == "embedder" or k not in given})

    ra = wired(cfg.data.retrieval_augment, embedder=own, query_instruction=instruction)
    retrieval = wired(cfg.serve.retrieval, query_instruction=instruction)
    return cfg.model_copy(update={
        "data": cfg.data.model_copy(update={"retrieval_augment": ra}),
        "serve": cfg.serve.model_copy(update={"embedder": own, "retrieval": retrieval})})


def _resolve_path(src: str, base_dir: Path) -> str:
    if "://" in src or Path(src).is_absolute():
        return src
    candidate = (base_dir / src).resolve()
    if not candidate.exists() and Path(src).exists():
        candidate = Path(src).resolve()
    return str(candidate)


def _resolve_source(cfg: JobConfig, base_dir: Path) -> JobConfig:
    data = cfg.data.model_copy(update={
        # with documents, data.source is unused and stays the default (DataConfig checks it is)
        "source": cfg.data.source if cfg.data.documents else _resolve_path(cfg.data.source, base_dir),
        "kb_sources": [_resolve_path(p, base_dir) for p in cfg.data.kb_sources],
        "documents": [_resolve_path(p, base_dir) for p in cfg.data.documents]})
    embed = cfg.embed.model_copy(update={"source": _resolve_path(cfg.embed.source, base_dir)})
    update = {"data": data, "embed": embed}
    if cfg.train.preference.source is not None:
        pref = cfg.train.preference.model_copy(update={"source": _resolve_path(cfg.train.preference.source, base_dir)})
        update["train"] = cfg.train.model_copy(update={"preference": pref})
    if cfg.eval.source is not None:
        update["eval"] = cfg.eval.model_copy(update={"source": _resolve_path(cfg.eval.source, base_dir)})
    if cfg.requires:
        update["requires"] = [r.model_copy(update={"job": _resolve_path(r.job, base_dir)}) for r in cfg.requires]
    return cfg.model_copy(update=update)


def load_job(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> JobConfig:
    """Load and validate a YAML job file, with command-line `overrides` (`dotted.key=value`)."""
    path = Path(path)
    if not path.is_file():
        raise RayFTError(f"{path}: job file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise RayFTError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    return parse_job(data, source=str(path), base_dir=path.resolve().parent, overrides=overrides)


RESOLVED_FILE = "config.resolved.yaml"


def write_resolved(cfg: JobConfig) -> Path:
    """Write the config a command runs with (file + overrides + defaults, paths resolved) to
    run_dir/config.resolved.yaml; `load_job` of that file gives the same config."""
    from ray_ft.io import write_text_atomic

    path = cfg.run_dir / RESOLVED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
    write_text_atomic(path, text)
    return path
