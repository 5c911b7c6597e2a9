"""`embed.lsr`: LM-supervised retrieval (RA-DIT's retriever half, REPLUG's LSR)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_ft.config.base import _Strict


class LSRConfig(_Strict):
    """After (or instead of) the contrastive training, train the embedder so that its softmax over
    each training question's top-`candidates` passages matches the generator's softmax over how
    likely it makes the reference answer given each passage (KL divergence; RA-DIT's
    p_LSR(c|x,y) ∝ exp(score_LM(y|c∘x)/lm_temperature)). The question needs an answer: a CSV
    source with an `answer` column."""

    enabled: bool = Field(
        False, description="The embed stage trains with LSR (to runs/NAME/embed/lsr/model, which the job then "
        "serves) and writes the LM's scores of every candidate to embed/lsr/lsr_scores.parquet.",
    )
    start_from: Literal["contrastive", "base"] = Field(
        "contrastive", description="Where LSR starts: the contrastive result (RA-DIT's order), or embed.model "
        "(LSR alone, no contrastive stage).",
    )
    lm: str | None = Field(
        None, description="The generator whose likelihoods supervise: a causal-LM folder or packaged name "
        "(None: the job's model.name, the base). A merged SFT model is the RA-DIT choice.",
    )
    candidates: int = Field(8, ge=2, le=64, description="Passages retrieved per training question (k).")
    max_queries: int | None = Field(
        2000, ge=1, description="Training questions scored and trained on (a seeded sample; None: all). "
        "The LM scores queries x candidates prompts.",
    )
    lm_score: Literal["mean_logprob", "logprob"] = Field(
        "mean_logprob", description="The LM's score of a passage: the answer's log-likelihood per answer token "
        "(long answers do not dominate), or its total.",
    )
    lm_temperature: float = Field(0.1, gt=0.0, description="Temperature of the LM's softmax over the candidates.")
    retriever_temperature: float | None = Field(
        None, gt=0.0, description="Temperature of the retriever's softmax over the candidates' cosines "
        "(None: embed.temperature).",
    )
    contrastive_weight: float = Field(
        0.0, ge=0.0, description="Weight of an InfoNCE term (gold passage against the candidates and the batch) "
        "mixed into the KL loss; it needs the gold passage, so it is 0 for queries without one.",
    )
    lm_max_len: int = Field(768, ge=32, description="Tokens of prompt + answer the LM scores (the passage is cut).")
    lm_batch_size: int = Field(8, ge=1, description="Prompts per LM forward pass.")
    lm_workers: int = Field(1, ge=1, description="Ray Data actors scoring with the LM.")
    lm_cpus: float = Field(2, gt=0, description="Logical CPUs (and torch threads) per scoring actor.")
    lm_use_gpu: bool = Field(False, description="One GPU per scoring actor.")
    lm_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        "auto", description="Weights and compute of the scoring LM; auto: bf16 on GPUs and on CPUs that compute "
        "bf16 natively (AVX512-BF16/AMX), fp32 elsewhere.",
    )
    learning_rate: float = Field(1e-5, gt=0.0, description="Peak AdamW learning rate.")
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0, description="Linear warm-up share of steps.")
    num_train_epochs: float = Field(1.0, gt=0.0, description="Passes over the scored questions.")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many steps (overrides epochs).")
    per_device_batch_size: int = Field(16, ge=1, description="Questions per worker per step (x candidates passages).")
    eval_every_n_steps: int | None = Field(None, ge=1, description="Validate + checkpoint every n steps (always at the end).")
