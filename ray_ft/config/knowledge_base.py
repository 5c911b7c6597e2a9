"""`serve.knowledge_base`: where the served retriever's nodes live and how they are searched."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ray_ft.config.base import _Strict


class KnowledgeBaseConfig(_Strict):
    """The knowledge base as a LanceDB table (a folder by default; `s3://`/`gs://` on a cluster):
    one row per node with its text, metadata and one vector column per embedder (named by the
    embedder's fingerprint, so a changed embedder is never served stale). Built by Ray Data before
    the graph deploys; retriever replicas open it read-only."""

    uri: str | None = Field(
        None, description="LanceDB database: a folder or an object-storage URI (None: the run "
        "folder's knowledge_base.lance).",
    )
    storage_options: dict[str, str] = Field(
        default_factory=dict, description="LanceDB/object-store options for a `uri` on object storage, "
        "e.g. {aws_endpoint: http://minio:9000, aws_region: us-east-1, allow_http: 'true'}. "
        "Credentials come from the environment (AWS_ACCESS_KEY_ID, ...), never from the job file.",
    )
    table: str | None = Field(
        None, description="Table name (None: nodes_NODE_GROUP, one table per serve.node_group)."
    )
    embed_batch_size: int = Field(64, ge=1, description="Nodes embedded per Ray Data batch.")
    embed_workers: int = Field(1, ge=1, description="Embedding actors of the build (Ray Data).")
    embed_cpus: float = Field(1.0, gt=0, description="CPUs per embedding actor.")
    embed_use_gpu: bool = Field(False, description="One GPU per embedding actor.")
    write_every: int = Field(
        1024, ge=1, description="Embedded nodes committed per table write: a build that stops "
        "half-way keeps what it committed, and its rerun embeds only the rest.",
    )
    fts_tokenizer: Literal["auto", "words", "cjk", "ngram"] = Field(
        "auto", description="Full-text index tokenizer. words: LanceDB's simple tokenizer (lower-cased "
        "words, English stemming); cjk: words plus, for CJK runs, character unigrams and bigrams "
        "(Chinese has no spaces: ray_ft.kb.terms), written to a `terms` column "
        "that LanceDB indexes by whitespace; ngram: LanceDB's character 1-2-grams of all text. "
        "auto: cjk for data.language zh, words otherwise.",
    )
    ann_min_rows: int = Field(
        100_000, ge=256, description="A vector index (ann_index) is built once the table holds this "
        "many rows; below it the search is exact (a flat scan is faster there and has no recall loss).",
    )
    ann_index: Literal["IVF_PQ", "IVF_HNSW_SQ"] = Field("IVF_HNSW_SQ", description="LanceDB vector index type.")
    ann_partitions: int | None = Field(None, ge=1, description="IVF partitions (None: LanceDB's choice, ~sqrt(rows)).")
    ann_sub_vectors: int | None = Field(None, ge=1, description="IVF_PQ sub-vectors (None: LanceDB's choice).")
    nprobes: int = Field(20, ge=1, description="IVF partitions searched per query.")
    refine_factor: int | None = Field(
        2, ge=1, description="Re-rank refine_factor x top_k ANN candidates by exact distance (None: "
        "the index's quantized distances only). IVF_HNSW_SQ's misses are mostly quantization error, "
        "which this removes for a little latency (bench/ann_recall.py).",
    )
    refresh_s: float = Field(
        5.0, ge=0, description="How stale a replica's view of the table may get: it checks for a newer "
        "table version at most this often (0: before every search).",
    )
