"""The knowledge base as a LanceDB table: one row per node, one vector column per embedder.

Rows: `node_id` (the key), `text`, `text_sha` (so a node whose text changed is re-embedded),
`document` (the passage or document a node comes from: what `delete_documents` removes),
`metadata` (JSON) and `vec_<fingerprint>` columns. A vector column is named by the embedder's
fingerprint (`embedder_fingerprint`: the weights' bytes and the dtype), so vectors of an older or
other embedder are never searched with this one's queries. LanceDB does the searching: exact
(flat) vector search below `ann_min_rows`, an IVF index above it, its BM25 full-text index, and
hybrid search fused by reciprocal rank; writes are merge-inserts on `node_id`, each a new table
version (Lance's commit protocol keeps concurrent writers from corrupting it).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.errors import RayFTError
from ray_ft.serve.protocols import Hit
from ray_ft.kb.terms import lexical_tokens

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".txt", ".model")


def embedder_fingerprint(model_dir: str, dtype: str = "float32") -> str:
    """12 hex digits naming an embedder by its files' bytes (weights, config, tokenizer) and dtype:
    the same model on any machine or path gives the same name; a re-trained one, another."""
    folder = Path(model_dir)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise RayFTError(f"{model_dir}: no embedder files to fingerprint")
    # Hashed once per set of files (a deploy asks twice: the build and the graph), not per call.
    return _hash_files(str(folder), dtype, tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))


@functools.lru_cache(maxsize=16)
def _hash_files(folder: str, dtype: str, stamp: tuple) -> str:
    h = hashlib.sha256(dtype.encode())
    for path, _, _ in stamp:
        h.update(b"\0" + str(Path(path).relative_to(folder)).encode() + b"\1")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:12]


def vector_column(fingerprint: str) -> str:
    return f"vec_{fingerprint}"


def text_sha(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def node_row(node: dict) -> dict:
    """A retrieval node {node_id, text, metadata} as a table row (vector not included)."""
    meta = node.get("metadata", {}) or {}
    return {"node_id": str(node["node_id"]), "text": node["text"], "text_sha": text_sha(node["text"]),
            "document": str(meta.get("document") or meta.get("passage_id") or node["node_id"]),
            "metadata": json.dumps(meta, ensure_ascii=False, sort_keys=True)}


def _schema():
    import pyarrow as pa

    return pa.schema([pa.field("node_id", pa.string(), nullable=False), pa.field("text", pa.string()),
                      pa.field("text_sha", pa.string()), pa.field("document", pa.string()),
                      pa.field("metadata", pa.string()), pa.field("terms", pa.string())])


@dataclass(frozen=True)
class KBStats:
    rows: int
    version: int
    indexes: tuple[str, ...]


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class KnowledgeBase:
    """One table of a LanceDB database, searched and written with one embedder's vector column."""

    def __init__(self, uri: str, table: str, fingerprint: str, dim: int | None = None,
                 cfg: KnowledgeBaseConfig | None = None, language: str = "en", create: bool = True):
        import lancedb

        self.cfg = cfg or KnowledgeBaseConfig()
        self.uri, self.name, self.language = uri, table, language
        self.column = vector_column(fingerprint)
        self._tokenizer: str | None = None
        self.db = lancedb.connect(uri, read_consistency_interval=timedelta(seconds=self.cfg.refresh_s),
                                  storage_options=self.cfg.storage_options or None)
        if table in self.db.table_names():
            self.table = self.db.open_table(table)
        elif create:
            self.table = self.db.create_table(table, schema=_schema(), exist_ok=True)
        else:
            raise RayFTError(f"{uri}: no knowledge-base table {table!r}; build it first (ray-ft kb build)")
        if dim is not None:
            self._ensure_vector_column(dim)

    # -- writing -----------------------------------------------------------------------------

    def _ensure_vector_column(self, dim: int) -> None:
        import pyarrow as pa

        field = self.table.schema.field(self.column) if self.column in self.table.schema.names else None
        if field is None:
            self.table.add_columns(pa.field(self.column, pa.list_(pa.float32(), dim)))
        elif field.type.list_size != dim:
            raise RayFTError(f"{self.uri}/{self.name}: column {self.column} holds {field.type.list_size}-d "
                             f"vectors, the embedder gives {dim}-d")

    def stale(self, nodes: list[dict]) -> list[dict]:
        """The nodes whose row is missing, whose text changed, or that lack this embedder's vector."""
        if self.column not in self.table.schema.names or not self.table.count_rows():
            return list(nodes)
        have = (self.table.search().where(f"{self.column} IS NOT NULL").select(["node_id", "text_sha"])
                .limit(None).to_arrow())  # never the vectors themselves: 1.5 GB at 10^6 nodes
        current = dict(zip(have.column("node_id").to_pylist(), have.column("text_sha").to_pylist()))
        return [n for n in nodes if current.get(str(n["node_id"])) != text_sha(n["text"])]

    def upsert(self, rows: list[dict], vectors: np.ndarray) -> None:
        """Insert or replace nodes (rows from `node_row`) with this embedder's vectors: one commit."""
        import pyarrow as pa

        if not rows:
            return
        vectors = np.asarray(vectors, dtype=np.float32)
        self._ensure_vector_column(vectors.shape[1])
        if self.tokenizer == "cjk":  # the terms the full-text index reads, one space apart
            rows = [{**r, "terms": " ".join(lexical_tokens(r["text"]))} for r in rows]
        data = pa.Table.from_pylist(rows, schema=_schema())
        data = data.append_column(self.column, pa.FixedSizeListArray.from_arrays(
            pa.array(vectors.ravel()), vectors.shape[1]))
        self.table.merge_insert("node_id").when_matched_update_all().when_not_matched_insert_all().execute(data)

    def delete_nodes_except(self, keep_ids: set[str]) -> int:
        """Remove every node not in `keep_ids` (a rebuild from the job's nodes); how many went."""
        ids = self.table.search().select(["node_id"]).limit(None).to_arrow().column("node_id").to_pylist() \
            if self.table.count_rows() else []
        gone = [i for i in ids if i not in keep_ids]
        for start in range(0, len(gone), 500):
            self.table.delete("node_id IN (" + ", ".join(_quote(i) for i in gone[start:start + 500]) + ")")
        return len(gone)

    def replace_documents(self, nodes: list[dict], vectors: np.ndarray) -> dict:
        """Write the nodes of some documents (added, or replacing their earlier nodes) in one
        merge, then drop the earlier nodes their new text no longer has: a search never sees a
        replaced document missing."""
        rows = [node_row(n) for n in nodes]
        self.upsert(rows, vectors)
        if not self._has_fts_index():
            self.ensure_indexes()  # a table that started empty has no full-text index yet
        docs = sorted({r["document"] for r in rows})
        return {"documents": len(docs), "nodes": len(nodes), "removed_nodes": self.prune_documents(docs, nodes),
                "version": self.table.version}

    def prune_documents(self, documents: list[str], nodes: list[dict]) -> int:
        """Delete the nodes of `documents` that are not among `nodes` (their current cut)."""
        if not documents:
            return 0
        before = self.table.count_rows()
        self.table.delete("document IN (" + ", ".join(_quote(d) for d in documents) + ") AND node_id NOT IN ("
                          + ", ".join(_quote(str(n["node_id"])) for n in nodes) + ")")
        return before - self.table.count_rows()

    def delete_documents(self, documents: list[str]) -> int:
        before = self.table.count_rows()
        if documents:
            self.table.delete("document IN (" + ", ".join(_quote(d) for d in documents) + ")")
        return before - self.table.count_rows()

    def ensure_indexes(self) -> tuple[str, ...]:
        """The full-text index on `text` (tokenizer per fts_tokenizer/language) and, past
        `ann_min_rows`, the vector index on this embedder's column; existing ones take new rows in
        (`optimize`). Returns the index names."""
        from lancedb.index import FTS

        rows = self.table.count_rows()
        if not rows:
            return ()
        if not self._has_fts_index():
            plain = dict(stem=False, remove_stop_words=False, ascii_folding=False)
            fts = {"words": FTS(base_tokenizer="simple", stem=True, remove_stop_words=False),
                   "ngram": FTS(base_tokenizer="ngram", ngram_min_length=1, ngram_max_length=2, prefix_only=False,
                                **plain),
                   "cjk": FTS(base_tokenizer="whitespace", lower_case=False, max_token_length=None, **plain)}
            self.table.create_index(self.fts_column, config=fts[self.tokenizer])
            self._tokenizer = None
        if rows >= self.cfg.ann_min_rows and not any(i.columns == [self.column] for i in self.table.list_indices()):
            self.table.create_index(metric="dot", vector_column_name=self.column, index_type=self.cfg.ann_index,
                                    num_partitions=self.cfg.ann_partitions, num_sub_vectors=self.cfg.ann_sub_vectors)
        else:
            self.table.optimize()
        return tuple(sorted(i.name for i in self.table.list_indices()))

    def _has_fts_index(self) -> bool:
        return any(i.columns in (["text"], ["terms"]) for i in self.table.list_indices())

    # -- reading -----------------------------------------------------------------------------

    def stats(self) -> KBStats:
        return KBStats(self.table.count_rows(), self.table.version,
                       tuple(sorted(i.name for i in self.table.list_indices())))

    def dense(self, vector: np.ndarray, top_k: int) -> list[Hit]:
        q = (self.table.search(np.asarray(vector, dtype=np.float32), vector_column_name=self.column)
             .distance_type("dot").nprobes(self.cfg.nprobes))
        if self.cfg.refine_factor:
            q = q.refine_factor(self.cfg.refine_factor)
        rows = q.select(["node_id", "text", "metadata", "_distance"]).limit(top_k).to_list()
        return [_hit(r, 1.0 - r["_distance"]) for r in rows]  # LanceDB's dot distance is 1 - dot

    @property
    def tokenizer(self) -> str:
        """The table's full-text tokenizer: what its index was built with (a replica's config does
        not override the table), else the config's (auto: cjk for zh, words otherwise)."""
        if self._tokenizer is None:
            indexed = {tuple(i.columns) for i in self.table.list_indices()}
            chosen = self.cfg.fts_tokenizer
            if chosen == "auto":
                chosen = "cjk" if self.language == "zh" else "words"
            if ("terms",) in indexed:
                chosen = "cjk"
            elif ("text",) in indexed and chosen == "cjk":
                chosen = "words"  # a text index: the raw query, whichever tokenizer built it
            self._tokenizer = chosen
        return self._tokenizer

    @property
    def fts_column(self) -> str:
        return "terms" if self.tokenizer == "cjk" else "text"

    def _fts_query(self, query: str) -> str:
        return " ".join(lexical_tokens(query)) if self.tokenizer == "cjk" else query

    def text(self, query: str, top_k: int) -> list[Hit]:
        query = self._fts_query(query)
        if not query.strip():
            return []
        rows = (self.table.search(query, query_type="fts", fts_columns=self.fts_column)
                .select(["node_id", "text", "metadata", "_score"]).limit(top_k).to_list())
        return [_hit(r, r["_score"]) for r in rows]

    def hybrid(self, vector: np.ndarray, query: str, top_k: int, candidates: int, rrf_k: int = 60) -> list[Hit]:
        """Vector and full-text rankings of `candidates` each (at least `top_k`), fused by
        LanceDB's RRF reranker."""
        from lancedb.rerankers import RRFReranker

        candidates = max(top_k, candidates)
        query = self._fts_query(query)
        if not query.strip():
            return self.dense(vector, top_k)
        rows = (self.table.search(query_type="hybrid", vector_column_name=self.column, fts_columns=self.fts_column)
                .vector(np.asarray(vector, dtype=np.float32)).text(query).distance_type("dot")
                .nprobes(self.cfg.nprobes).rerank(RRFReranker(K=rrf_k))
                .limit(candidates).to_list())  # no select: LanceDB warns when a sub-query lacks its score column
        return [_hit(r, r["_relevance_score"]) for r in rows[:top_k]]


def _hit(row: dict, score: float) -> Hit:
    return Hit(row["node_id"], row["text"], float(score), json.loads(row["metadata"] or "{}"))
