"""`train.*` (LLM fine-tuning, DeepSpeed) and `embed.*` (embedder fine-tuning, hard negatives)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from ray_ft.config.base import _Strict
from ray_ft.config.lsr import LSRConfig
from ray_ft.recipes import LLM_RECIPES, PREFERENCE_RECIPES


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


class PairMiningConfig(_Strict):
    """`ray-ft pairs JOB.yaml`: preference pairs from the served model's own answers to the
    training questions (never the held-out ones), with each question's own passage as context."""

    enabled: bool = Field(
        False, description="`ray-ft run` ends with a `pairs` stage (after eval): the pairs land in "
        "run_dir/pairs/pairs.jsonl, where a preference job's `train.preference.source` reads them.",
    )
    model: Literal["finetuned", "base"] = Field(
        "finetuned", description="Who answers: the job's trained adapter (train/adapter) or the base model.",
    )
    max_f1: float = Field(
        0.5, gt=0.0, le=1.0, description="An answer scoring below this CMRC F1 against the references "
        "becomes a pair (rejected = the answer, chosen = the reference).",
    )
    samples: int = Field(
        1, ge=1, le=8, description="Answers per question: the greedy one, then samples at `temperature` "
        "(distinct answers only).",
    )
    temperature: float = Field(0.8, gt=0.0, le=2.0, description="Temperature of the extra samples.")
    max_questions: int | None = Field(None, ge=1, description="Ask only the first n training questions.")
    concurrency: int = Field(8, ge=1, description="Requests in flight.")


class PreferenceConfig(_Strict):
    """Preference tuning (`train.method: dpo | orpo`): the pairs it learns from and its objective."""

    source: str | None = Field(
        None, description="Preference pairs: JSON array or JSONL of {prompt | messages, chosen, rejected} "
        "(TRL / LLaMA-Factory layout; local path relative to the job file, or a URI). Required for dpo/orpo.",
    )
    dev_size: float = Field(
        0.1, ge=0.0, lt=0.5, description="Share of the pairs (by prompt) held out to score reward accuracy "
        "and margin during training (0: none).",
    )
    beta: float = Field(0.1, gt=0.0, description="DPO: strength of the KL penalty toward the reference.")
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=0.5, description="DPO: assumed share of flipped labels (conservative DPO).",
    )
    orpo_lambda: float = Field(0.1, gt=0.0, description="ORPO: weight of the odds-ratio term beside the NLL.")
    val_max_pairs: int = Field(64, ge=1, description="Dev pairs scored at each validation.")
    mining: PairMiningConfig = Field(default_factory=PairMiningConfig)


SFT_METRICS = ("val_loss", "val_exact_match", "val_origin", "val_f1")
PREFERENCE_METRICS = ("val_loss", "val_reward_accuracy", "val_reward_margin")


class TrainConfig(_Strict):
    method: str = Field(
        "sft", description="Training recipe (`ray-ft recipes` lists them): sft (supervised; lora, freeze "
        "or full), dpo (direct preference optimisation against the adapter-disabled base), orpo "
        "(odds-ratio preference optimisation, no reference).",
    )
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
        "auto", description='"auto": bf16 on GPU, fp32 on CPU. bf16: lora keeps the frozen base in '
        "bfloat16 (adapters fp32); freeze/full keep fp32 weights and compute under bf16 autocast; "
        "DeepSpeed: bf16 mixed precision with fp32 master weights.",
    )
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass.")
    attn_implementation: Literal["auto", "sdpa", "flash_attention_2"] = Field(
        "auto", description='"auto": for packed shards (rows with position ids), ray_ft\'s packed '
        "attention (causal SDPA per packed example, no work on masked pairs; ray_ft/train/attention.py) "
        "and a batch of packed rows flattened into one row (no padding), else transformers' sdpa. "
        '"sdpa": transformers\' sdpa always (a packed row is one call with a block-diagonal mask; '
        'batches of packed rows are padded). "flash_attention_2": the flash-attn package\'s kernels '
        '(GPU; varlen for packed rows, flattened like "auto").',
    )
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
    val_generate_batch_size: int = Field(
        16, ge=1, description="Validation questions answered per `generate` call (left padded).",
    )
    metric_for_best: Literal["val_loss", "val_exact_match", "val_origin", "val_f1", "val_reward_accuracy",
                             "val_reward_margin"] = Field(
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
    preference: PreferenceConfig = Field(default_factory=PreferenceConfig)

    @property
    def is_preference(self) -> bool:
        """A preference recipe (dpo, orpo): it learns from `preference.source` pairs."""
        return self.method in PREFERENCE_RECIPES

    @model_validator(mode="after")
    def _check_combinations(self) -> "TrainConfig":
        if self.method not in LLM_RECIPES:
            raise ValueError(f"method={self.method!r} is not a recipe; choose one of {sorted(LLM_RECIPES)}")
        if self.is_preference:
            if self.preference.source is None:
                raise ValueError(f"method={self.method} needs preference.source (a pairs file)")
            if self.metric_for_best not in PREFERENCE_METRICS:
                raise ValueError(f"metric_for_best={self.metric_for_best} is an sft metric; {self.method} "
                                 f"reports {list(PREFERENCE_METRICS)}")
        elif self.metric_for_best not in SFT_METRICS:
            raise ValueError(f"metric_for_best={self.metric_for_best} is a preference metric; sft reports "
                             f"{list(SFT_METRICS)}")
        if self.method == "dpo" and self.finetuning_type != "lora":
            raise ValueError("method=dpo needs finetuning_type=lora: its reference is the base with the "
                             "adapter disabled (no second copy of the weights)")
        if self.early_stopping_patience and not self.eval_every_n_steps:
            raise ValueError("early_stopping_patience needs eval_every_n_steps")
        if self.metric_for_best in SFT_METRICS[1:] and self.val_generate_samples == 0:
            raise ValueError(f"metric_for_best={self.metric_for_best} needs val_generate_samples > 0")
        if self.attn_implementation == "flash_attention_2" and not self.use_gpu:
            raise ValueError("attn_implementation=flash_attention_2 needs use_gpu (flash-attn runs on CUDA only)")
        if self.export_merged and self.finetuning_type != "lora":
            raise ValueError("export_merged applies to lora only (freeze/full export a whole model)")
        return self


class HardNegativeConfig(_Strict):
    """Negatives mined with an embedder, as FlagEmbedding's hn_mine: sampled from a window of
    the ranking of the training passages for each query, the query's positives removed."""

    enabled: bool = Field(False, description="Mine hard negatives instead of random ones.")
    model: str | None = Field(None, description="Embedder that mines (None: embed.model).")
    range_for_sampling: tuple[int, int] = Field(
        (2, 200), description="Ranks [lo, hi) of the ranking (0 = most similar) the negatives are "
        "sampled from; skipping the top few avoids unlabeled positives.",
    )
    query_instruction: str = Field("", description="Prefix of each query when mining.")

    @model_validator(mode="after")
    def _check_range(self) -> "HardNegativeConfig":
        lo, hi = self.range_for_sampling
        if not 0 <= lo < hi:
            raise ValueError(f"range_for_sampling must be 0 <= lo < hi, got {self.range_for_sampling}")
        return self


class EmbedConfig(_Strict):
    """Contrastive fine-tuning of the embedder (`task: embedding`, or the `embed` stage of
    `ray-ft run` with `enabled`), FlagEmbedding's recipe."""

    enabled: bool = Field(
        False, description="task sft: `ray-ft run` fine-tunes this embedder first (stage `embed`, "
        "to runs/NAME/embed/model), then serves it, retrieves with it for data.retrieval_augment, "
        "and prefixes queries with query_instruction there.",
    )
    model: str = Field("all-MiniLM-L6-v2", description="Sentence-transformers model to fine-tune.")
    source: str = Field(
        "../../shared/datasets/financial-qa-10k/financial_qa_10k.csv",
        description="CSV with question and context columns (answer optional), a QA source that SFT reads "
        "(SQuAD JSON such as CMRC2018, QA rows), or a FlagEmbedding triplet .jsonl (relative paths: against "
        "the job file).",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A row with an empty question/context: stop with its line, or skip and count."
    )
    test_size: float = Field(0.1, gt=0.0, lt=1.0, description="Share of contexts held out for retrieval eval.")
    seed: int = Field(
        1314, description="Seed of the split, the negatives and the (shuffled, then fixed) training order."
    )
    neg_num: int = Field(10, ge=1, description="Negatives stored per query (never its own context).")
    hard_negatives: HardNegativeConfig = Field(default_factory=HardNegativeConfig)
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
    lsr: LSRConfig = Field(default_factory=LSRConfig)
