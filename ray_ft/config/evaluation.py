"""`eval.*`: what is compared (models, endpoints, adapters) and how (modes, judge)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_ft.config.base import SafeName, _Strict, safe_keys


class EndpointConfig(_Strict):
    label: SafeName = Field(..., description="Name of this model in the report.")
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
    source: str | None = Field(
        None, description="A separate eval set (same URI forms and readers as data.source; QA "
        "records: SQuAD JSON, QA rows). Set: every record of data.source trains (no eval_size split), "
        "the eval questions come from here (bad records follow data.on_error / bad_answer) and the "
        "knowledge base holds their passages plus data.kb_sources. None: data.eval_size of "
        "data.source's passages is held out. Relative paths: against the job file.",
    )
    format: Literal["auto", "squad", "qa_rows"] = Field(
        "auto", description="Format of eval.source (auto: from the extension and the first record)."
    )
    leakage: Literal["drop", "warn", "error"] = Field(
        "drop", description="eval.source questions whose passage or question text is also in "
        "data.source (exact after whitespace normalisation): drop them from the eval set, keep them "
        "with a warning, or stop with an error naming both files. Counted in the manifest and report.",
    )
    max_samples: int = Field(50, ge=1, description="Held-out questions to evaluate.")
    modes: list[Literal["gold", "retrieved", "reranked"]] = Field(
        ["gold", "retrieved"], min_length=1,
        description='"gold": the question\'s own passage (the 100%-recall control); '
        '"retrieved": top-k passages from the served retriever (its first stage alone); '
        '"reranked": the retriever\'s serve.rerank.candidates reordered by the reranker, top-k kept.',
    )
    models: list[Literal["base", "finetuned"]] = Field(
        ["base", "finetuned"], min_length=1, description="Which served models to compare."
    )
    concurrency: int = Field(8, ge=1, description="Requests in flight (lets vLLM batch).")
    endpoints: list[EndpointConfig] = Field(
        [], description="Other OpenAI-compatible models compared side by side (same prompts, same contexts)."
    )
    adapters: dict[str, str] = Field(
        {}, description="More LoRA adapters served on the same base and compared: {label: folder or "
        "object-storage URI (s3://, gs://), fetched where the engine runs}."
    )
    adapter: str | None = Field(
        None, description='Adapter evaluated as "finetuned" by `ray-ft eval`: a folder (relative to the '
        "working directory) or an object-storage URI (default: the run's train/adapter).",
    )
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    plots: bool = Field(True, description="Write metrics.png (and loss.png after training).")

    @field_validator("adapters")
    @classmethod
    def _check_adapter_labels(cls, adapters: dict[str, str]) -> dict[str, str]:
        return safe_keys(adapters)

    @model_validator(mode="after")
    def _check_labels(self) -> "EvalConfig":
        labels = [*self.models, *self.adapters, *(e.label for e in self.endpoints)]
        dupes = sorted({x for x in labels if labels.count(x) > 1})
        if dupes:
            raise ValueError(f"model labels must be unique; repeated: {dupes}")
        if self.judge.enabled and self.judge.model not in labels:
            raise ValueError(f"judge.model '{self.judge.model}' is not one of the compared models {labels}")
        return self
