"""The reranker: training a cross-encoder (`rerank`) and putting it between the retriever and the
generator in the served graph (`serve.rerank`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_ft.config.base import _Strict
from ray_ft.config.train import TrainConfig


class RerankConfig(_Strict):
    """Cross-encoder training on the embedding data (`embed.source`, its negatives — mine them
    with `embed.hard_negatives`), FlagEmbedding's reranker recipe: each query with its positive
    and `train_group_size - 1` negatives, a listwise softmax cross-entropy over the group."""

    enabled: bool = Field(
        False, description="`ray-ft run` trains the reranker (stage `rerank`, to runs/NAME/rerank/model) "
        "after the embedder; `serve.rerank` serves it. A task: rerank job trains it alone (`ray-ft train`).",
    )
    model: str = Field(
        "all-MiniLM-L6-v2", description="Where the cross-encoder starts: a cross-encoder folder keeps its "
        "head; a plain encoder (packaged name, Hugging Face id or folder) gets a fresh one-logit head.",
    )
    train_group_size: int = Field(8, ge=2, description="Passages per query in a step: 1 positive + (n-1) negatives.")
    max_len: int = Field(320, ge=16, description="Tokens of query + passage kept (the passage is cut).")
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Linear warm-up share of steps.")
    weight_decay: float = Field(0.01, ge=0.0, description="AdamW weight decay.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the training triplets.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (overrides epochs).")
    per_device_batch_size: int = Field(8, ge=1, description="Queries per worker per step (x train_group_size pairs).")
    candidates: int = Field(
        20, ge=2, description="First-stage passages per question that validation and the test evaluation "
        "rerank (the served graph's is serve.rerank.candidates).",
    )
    val_max_queries: int = Field(200, ge=1, description="Validation questions reranked at each evaluation.")
    eval_every_n_steps: int | None = Field(None, ge=1, description="Validate + checkpoint every n steps (always at the end).")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop after this many validations without a better MRR (None: never).")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept, best validation MRR first.")
    max_failures: int = Field(1, ge=0, description="Worker-group restarts from the latest checkpoint.")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        "auto", description="auto: bf16 on GPUs and on CPUs with native bf16, else fp32.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers.")
    use_gpu: bool = Field(False, description="One GPU per worker.")
    cpus_per_worker: float = Field(2, gt=0, description="Logical CPUs (and torch threads) per worker.")
    seed: int = Field(42, description="Seed of the head's initialisation, the negatives drawn and dropout.")

    def step_settings(self) -> TrainConfig:
        """The optimizer, schedule and precision settings in the form the shared stepper reads
        (`ray_ft.train.steppers`): a full fine-tune with a linear schedule, clipped at 1.0."""
        return TrainConfig(
            finetuning_type="full", learning_rate=self.learning_rate, warmup_ratio=self.warmup_ratio,
            weight_decay=self.weight_decay, lr_scheduler_type="linear", max_grad_norm=1.0,
            precision=self.precision, num_workers=self.num_workers, use_gpu=self.use_gpu,
            cpus_per_worker=self.cpus_per_worker, seed=self.seed, eval_every_n_steps=self.eval_every_n_steps,
            tensorboard=False)


class ServeRerankSettings(_Strict):
    """A `RerankerDeployment` in the served graph: the retriever fetches `candidates` passages, the
    cross-encoder scores them against the query and the best `serve.top_k` go to the generator;
    `POST /v1/rerank` serves it alone."""

    enabled: bool = Field(False, description="Rerank the retrieved passages (off until it wins on your data).")
    model: str | None = Field(
        None, description="Cross-encoder folder or packaged name; None: the job's own (runs/NAME/rerank/model, "
        "needs rerank.enabled).",
    )
    candidates: int = Field(20, ge=1, le=200, description="Passages the retriever fetches for the reranker.")
    max_len: int = Field(512, ge=16, description="Tokens of query + passage scored.")
    max_documents: int = Field(256, ge=1, description="Documents one /v1/rerank request may carry.")
    cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved for the reranker.")
    threads: int = Field(0, ge=0, description="Torch threads of the reranker (0: every core of the node).")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="Weights dtype of the reranker.")
    max_batch_size: int = Field(8, ge=1, description="Requests scored together in one model call.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, description="How long a request waits for company.")
