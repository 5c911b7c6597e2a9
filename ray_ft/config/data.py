"""`data.*`: the prepare stage (sources, templates, truncation, splits, knowledge base, RA-DIT)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from ray_ft.config.base import _Strict, safe_keys
from ray_ft.config.generation import QAGenerationConfig


class NodeGroupConfig(_Strict):
    """How knowledge-base documents are cut into retrieval nodes."""

    kind: Literal["passage", "line", "sentence", "chunk"] = Field(
        "passage", description="passage: one node per document; line: per non-empty line; "
        "sentence: per sentence (ends at 。！？!? or at . ! ? before a space); chunk: fixed windows.",
    )
    chunk_size: int = Field(256, ge=16, description="chunk: characters per node.")
    chunk_overlap: int = Field(32, ge=0, description="chunk: characters shared by consecutive nodes.")

    @model_validator(mode="after")
    def _check_overlap(self) -> "NodeGroupConfig":
        if self.chunk_overlap >= self.chunk_size:
            raise ValueError(f"chunk_overlap={self.chunk_overlap} must be smaller than chunk_size={self.chunk_size}")
        return self


def _default_node_groups() -> dict[str, NodeGroupConfig]:
    return {kind: NodeGroupConfig(kind=kind) for kind in ("passage", "line", "sentence", "chunk")}


class RetrievalAugmentConfig(_Strict):
    """RA-DIT-style training data: each training question paired with retrieved passages."""

    enabled: bool = Field(False, description="Build the training examples from retrieved passages "
                          "instead of each question's own passage.")
    embedder: str = Field(
        "all-MiniLM-L6-v2", description="Embedding model that retrieves (packaged name, HF id or a "
        "folder, e.g. a fine-tuned runs/NAME/embed/model).",
    )
    top_k: int = Field(3, ge=1, le=20, description="Passages retrieved per question, from the "
                       "training split's passages (held-out passages are never retrieved).")
    separate_context: bool = Field(
        True, description="true: k examples per question, one per retrieved passage; false: one "
        "example with the k passages joined.",
    )
    query_instruction: str = Field("", description="Prefix of each question when it is embedded.")


class DataConfig(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        # `val_*` names mean the dev split (val.parquet, val_loss); the eval share was renamed.
        if isinstance(data, dict) and "val_size" in data:
            raise ValueError("data.val_size is now data.eval_size (the held-out share the eval stage scores; "
                             "data.dev_size is the dev split that validates during training)")
        return data

    source: str = Field(
        "../shared/datasets/cmrc2018/cmrc2018_dev.json",
        description="The SFT corpus: a local path, a pyarrow filesystem URI (s3://, gs://, file://) "
        "or `hf://NAME[:SPLIT]`. Relative paths resolve against the job file's folder, then the "
        "working directory.",
    )
    format: Literal["auto", "squad", "qa_rows", "alpaca", "messages"] = Field(
        "auto", description="squad: SQuAD-layout JSON; qa_rows: CSV/JSONL/HF rows with question, "
        "context and answer(s); alpaca / messages: instruction data (no eval set). auto: from the "
        "extension and the first record.",
    )
    on_error: Literal["raise", "skip"] = Field(
        "raise", description="A bad record: stop with an error naming file, record and field, or "
        "skip it and count it in the manifest.",
    )
    bad_answer: Literal["raise", "repair"] = Field(
        "repair", description="Sources with answer offsets: a misplaced answer_start is moved to "
        "where the text is and a reference not in its context is dropped (both counted; a "
        "question left without references is a bad record), or either one is an error.",
    )
    language: Literal["zh", "en"] = Field("zh", description="Which built-in prompt template to use.")
    prompt_template: str | None = Field(
        None, description="User-turn template with {context} and {question} (None: the "
        "language's built-in one). Training and serving use the same.",
    )
    eval_size: float = Field(
        0.2, gt=0.0, lt=1.0,
        description="Share of groups (passages; for instruction data, distinct first prompts) held "
        "out for the eval stage, so no group is in both halves (`dev_size` is the dev split that "
        "validates during training).",
    )
    max_samples: int | None = Field(
        64, gt=0, description="At most this many training examples (None: all)."
    )
    cutoff_len: int = Field(
        2048, ge=32,
        description="Maximum tokens per training example; the answer is never cut (see truncation).",
    )
    truncation: Literal["shorten_context", "drop"] = Field(
        "shorten_context", description="A QA example over cutoff_len: cut its context to a window "
        "around the answer, or drop it (counted either way). Conversations are always dropped.",
    )
    seed: int = Field(42, description="Seed of the splits and of the sample selection.")
    num_shards: int | None = Field(
        None, ge=1, description="Parquet shards written for the training set (None: one per "
        "training worker).",
    )
    num_workers: int = Field(
        1, ge=1, description="Ray Data actors that template and tokenize (and embed, for retrieval "
        "augmentation and hard negatives); 1 logical CPU and 1 thread each.",
    )
    packing: bool = Field(
        False, description="Pack several examples into each training row of up to cutoff_len tokens; "
        "position ids restart per example, so attention never crosses examples. Preference recipes "
        "(dpo, orpo): each micro-batch's chosen and rejected sequences go end to end in one row "
        "(padding-free) instead of padded rows.",
    )
    packing_len: int | None = Field(
        None, ge=32, description="Tokens per packed row (None: cutoff_len). Longer than cutoff_len, "
        "several examples share a row: e.g. cutoff_len 512 with packing_len 2048 packs ~4 examples "
        "per row, so each step runs larger matrix products than one 512-token example would.",
    )
    dev_size: float = Field(
        0.0, ge=0.0, lt=0.5,
        description="Share of the training groups held out as the validation set used during "
        "training (0: none), apart from the eval set.",
    )
    sft_format: Literal["alpaca", "messages"] = Field(
        "messages", description="Form of data/sft_train.jsonl, the training examples as built "
        "(Alpaca or OpenAI messages records, with the passages they came from).",
    )
    kb_sources: list[str] = Field(
        [], description="Plain-text documents added to the knowledge base: .txt/.md files or "
        "folders of them, one document per file (relative paths: against the job file).",
    )
    node_groups: dict[str, NodeGroupConfig] = Field(
        default_factory=_default_node_groups,
        description="Named ways to cut the knowledge base into retrieval nodes; each is written to "
        "data/nodes/NAME.jsonl and `serve.node_group` picks one.",
    )
    retrieval_augment: RetrievalAugmentConfig = Field(default_factory=RetrievalAugmentConfig)
    documents: list[str] = Field(
        [], description="Your own documents instead of a QA corpus: PDF, HTML, Markdown and text files, "
        "folders of them, globs, or s3:// / gs:// URIs (relative paths: against the job file). Set, "
        "they are cut into nodes (document_nodes), an LLM writes QA pairs per node (qa_generation) "
        "into data/generated_qa.jsonl, and those pairs replace data.source; the knowledge base holds "
        "every node.",
    )
    document_nodes: NodeGroupConfig = Field(
        default_factory=lambda: NodeGroupConfig(kind="chunk", chunk_size=800, chunk_overlap=100),
        description="How data.documents are cut into the nodes questions are written for (and that the "
        "knowledge base holds); within a PDF page or under one heading.",
    )
    qa_generation: QAGenerationConfig = Field(default_factory=QAGenerationConfig)

    @field_validator("node_groups")
    @classmethod
    def _check_group_names(cls, groups: dict) -> dict:
        return safe_keys(groups)

    @model_validator(mode="after")
    def _check_template(self) -> "DataConfig":
        if self.prompt_template is not None:
            from ray_ft.data.templates import template_fields

            fields = template_fields(self.prompt_template)
            if fields != {"context", "question"}:
                raise ValueError(f"prompt_template must use exactly {{context}} and {{question}}; "
                                 f"it uses {sorted(fields)}")
        if self.packing_len is not None and self.packing_len < self.cutoff_len:
            raise ValueError(f"packing_len={self.packing_len} < cutoff_len={self.cutoff_len}: an example of "
                             "cutoff_len tokens would fit no row")
        # compared with the default, not model_fields_set: a dumped and re-read config (a Ray
        # Train worker's) carries every field as set
        if self.documents and self.source != type(self).model_fields["source"].default:
            raise ValueError("data.source and data.documents are two ways to give the training data: "
                             "set one (with documents the QA pairs are generated)")
        if self.documents and self.format in ("alpaca", "messages"):
            raise ValueError("data.documents generate QA pairs; data.format must be auto or qa_rows")
        if self.retrieval_augment.enabled and self.format in ("alpaca", "messages"):
            raise ValueError("retrieval_augment needs a QA source (squad or qa_rows): instruction "
                             "data has no questions and passages to retrieve for")
        return self
