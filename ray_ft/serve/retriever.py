"""The retriever deployment and the two places its nodes can live (`serve.knowledge_base.store`).

- `MemoryIndex`: the replica embeds every node at start (through the embedder deployment) and
  ranks them by exact numpy cosine and an in-process BM25; `persist_index` keeps the vectors on
  disk. Right for a few thousand nodes and a replica or two.
- `LanceIndex`: the replica opens the job's LanceDB table (built before the graph deploys, by Ray
  Data) and only embeds queries: N replicas cost no re-embedding, and a table written while it
  is served is seen at its next version (`knowledge_base.refresh_s`).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_ft.config import NodeGroupConfig, RetrievalSettings
from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.data.nodes import build_nodes
from ray_ft.serve.engines import VectorIndex
from ray_ft.serve.protocols import Hit
from ray_ft.serve.resilience import Deadline, call_with_retries
from ray_ft.serve.retrieval import BM25Index, load_index, nodes_fingerprint, reciprocal_rank_fusion, save_index


class MemoryIndex:
    """Nodes held by the replica: exact cosine over vectors from the embedder, and BM25."""

    source = "built"  # or "loaded" (persisted vectors reused)

    def __init__(self, nodes: list[dict], r: RetrievalSettings, index_dir: str | None, embedder_id: str):
        self.nodes, self.r = nodes, r
        self.bm25 = BM25Index(nodes, r.bm25_k1, r.bm25_b) if r.mode != "dense" else None
        self.index_dir = Path(index_dir) if index_dir else None
        self.fingerprint = nodes_fingerprint(nodes, embedder_id)
        self.vectors: VectorIndex | None = None

    @property
    def needs_build(self) -> bool:
        return self.r.mode != "bm25"

    async def build(self, embed) -> None:
        vecs = load_index(self.index_dir, self.fingerprint) if self.index_dir else None
        self.source = "loaded" if vecs is not None else "built"
        if vecs is None:
            # The whole knowledge base in one call: may take long, so no request deadline.
            vecs = await embed([n["text"] for n in self.nodes], 24 * 3600)
            if self.index_dir:
                save_index(self.index_dir, self.fingerprint, vecs)
        self.vectors = VectorIndex(self.nodes, vecs)

    def size(self) -> int:
        return len(self.nodes)

    def dense(self, qvec: np.ndarray, top_k: int) -> list[Hit]:
        return self.vectors.search(qvec, top_k)

    def text(self, query: str, top_k: int) -> list[Hit]:
        return self.bm25.search(query, top_k)

    def hybrid(self, qvec: np.ndarray, query: str, top_k: int) -> list[Hit]:
        n = max(top_k, self.r.candidates)
        return reciprocal_rank_fusion([self.dense(qvec, n), self.text(query, n)], top_k, self.r.rrf_k)


class LanceIndex:
    """The job's LanceDB table, opened read-only by the replica; LanceDB does every search."""

    source = "lancedb"
    needs_build = True  # opening the table (it checks this embedder's vectors are there)

    def __init__(self, spec: dict, r: RetrievalSettings):
        self.spec, self.r, self.kb = spec, r, None

    async def build(self, embed) -> None:
        from ray_ft.kb.store import KnowledgeBase

        s = self.spec
        kb = await asyncio.to_thread(KnowledgeBase, s["uri"], s["table"], s["fingerprint"], None,
                                     KnowledgeBaseConfig.model_validate(s["cfg"]), s["language"], False)
        if kb.column not in kb.table.schema.names:
            from ray_ft.errors import RayFTError

            raise RayFTError(f"{s['uri']}/{s['table']}: no vectors of the served embedder ({kb.column}); "
                             "build the knowledge base with it first (ray-ft kb build)")
        self.kb = kb

    def size(self) -> int:
        return self.kb.table.count_rows()

    def dense(self, qvec: np.ndarray, top_k: int) -> list[Hit]:
        return self.kb.dense(qvec, top_k)

    def text(self, query: str, top_k: int) -> list[Hit]:
        return self.kb.text(query, top_k)

    def hybrid(self, qvec: np.ndarray, query: str, top_k: int) -> list[Hit]:
        return self.kb.hybrid(qvec, query, top_k, max(top_k, self.r.candidates), self.r.rrf_k)


@serve.deployment
class RetrieverDeployment:
    """Knowledge-base nodes ranked dense, BM25, or both fused by reciprocal rank
    (`serve.retrieval`), from the replica's memory or from the job's LanceDB table
    (`knowledge_base`: uri, table, fingerprint, cfg, language)."""

    def __init__(self, documents: list[dict], node_group: NodeGroupConfig | str, embedder: DeploymentHandle,
                 timeout_s: float = 300.0, retries: int = 2, retrieval: dict | None = None,
                 index_dir: str | None = None, embedder_id: str = "", knowledge_base: dict | None = None):
        self.embedder, self.node_group = embedder, node_group
        self.timeout_s, self.retries = timeout_s, retries
        self.r = RetrievalSettings.model_validate(retrieval or {"mode": "dense"})
        if self.r.mode == "auto":
            raise ValueError("retrieval mode 'auto' must be resolved for the job's language first "
                             "(ServeConfig.retrieval_for)")
        self.store = LanceIndex(knowledge_base, self.r) if knowledge_base else \
            MemoryIndex(build_nodes(documents, node_group), self.r, index_dir, embedder_id)
        self.index = None  # the store, once built
        self._build: asyncio.Future | None = None

    @property
    def index_source(self) -> str | None:
        return self.store.source if self.index is not None else None

    async def _embed(self, texts: list[str], timeout_s: float) -> np.ndarray:
        return await call_with_retries(lambda: self.embedder.embed.remote(texts), "embedder",
                                       Deadline(timeout_s), self.retries)

    async def _build_index(self) -> None:
        await self.store.build(self._embed)
        self.index = self.store

    def _index_build(self) -> asyncio.Future | None:
        """The one build of the index, started on first need. It runs apart from the request
        that started it: a request cancelled at its deadline does not cancel the build (else a
        knowledge base slower to embed than a request's deadline would never finish)."""
        if self._build is None and self.store.needs_build:
            self._build = asyncio.ensure_future(self._build_index())
            self._build.add_done_callback(self._forget_failed_build)
        return self._build

    def _forget_failed_build(self, build: asyncio.Future) -> None:
        if build.cancelled() or build.exception() is not None:
            self._build = None  # the next request or health check starts over

    async def check_health(self) -> None:
        """Serve calls this every few seconds from the replica's start: a new replica
        (autoscaled, or replacing a dead one) builds its index before its first request."""
        self._index_build()

    async def _built(self) -> None:
        build = self._index_build()
        if build is not None:
            await asyncio.shield(build)

    async def ready(self) -> dict:
        await self._built()
        return {"nodes": self.store.size(), "mode": self.r.mode, "index": self.index_source}

    async def retrieve(self, query: str, top_k: int):
        await self._built()  # not ready(): its node count is a table scan on the LanceDB store
        if self.r.mode == "bm25":
            return await asyncio.to_thread(self.store.text, query, top_k)
        qvec = (await self._embed([self.r.query_instruction + query], self.timeout_s))[0]
        if self.r.mode == "dense":
            return await asyncio.to_thread(self.store.dense, qvec, top_k)
        return await asyncio.to_thread(self.store.hybrid, qvec, query, top_k)

    # -- live updates (LanceDB store only) ---------------------------------------------------

    def _table(self):
        if not isinstance(self.store, LanceIndex):
            raise LiveUpdatesOff("live document updates need serve.knowledge_base.store: lancedb")
        return self.store.kb

    async def add_documents(self, documents: list[dict]) -> dict:
        """Cut `documents` ({id, text, metadata}) into nodes of the served node group, embed them
        (the embedder deployment, within the request's deadline) and write them to the table."""
        await self._built()
        kb = self._table()
        nodes = build_nodes([{"passage_id": d["id"], "text": d["text"],
                              "metadata": {**d.get("metadata", {}), "document": d["id"]}} for d in documents],
                            self.node_group)
        if not nodes:
            return {"documents": 0, "nodes": 0, "removed_nodes": 0, "version": kb.table.version}
        vecs = await self._embed([n["text"] for n in nodes], self.timeout_s)
        return await asyncio.to_thread(kb.replace_documents, nodes, vecs)

    async def delete_document(self, document_id: str) -> dict:
        await self._built()
        kb = self._table()
        gone = await asyncio.to_thread(kb.delete_documents, [document_id])
        return {"id": document_id, "deleted_nodes": gone, "version": kb.table.version}


class LiveUpdatesOff(ValueError):
    """The retriever serves from memory: there is no shared table to write documents to."""
