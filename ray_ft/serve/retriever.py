"""The retriever deployment: each replica opens the job's LanceDB table read-only (built before
the graph deploys, by Ray Data: `ray_ft.kb.build`) and only embeds queries, so N replicas cost no
re-embedding, and a table written while it is served is seen at its next version
(`knowledge_base.refresh_s`). LanceDB does every search: vector, full-text, hybrid.
"""

from __future__ import annotations

import asyncio

import numpy as np
from ray import serve
from ray.serve.handle import DeploymentHandle

from ray_ft.config import NodeGroupConfig, RetrievalSettings
from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.data.nodes import build_nodes
from ray_ft.errors import RayFTError
from ray_ft.serve.protocols import Hit
from ray_ft.serve.resilience import Deadline, call_with_retries


class LanceIndex:
    """The job's LanceDB table, opened read-only by the replica; LanceDB does every search."""

    def __init__(self, spec: dict, r: RetrievalSettings):
        self.spec, self.r, self.kb = spec, r, None

    def open(self) -> None:
        """Open the table; it must hold this embedder's vectors (else the replica would serve
        another embedder's vectors, or none)."""
        from ray_ft.kb.store import KnowledgeBase

        s = self.spec
        kb = KnowledgeBase(s["uri"], s["table"], s["fingerprint"], None,
                           KnowledgeBaseConfig.model_validate(s["cfg"]), s["language"], False)
        if kb.column not in kb.table.schema.names:
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
        return self.kb.hybrid(qvec, query, top_k, self.r.candidates, self.r.rrf_k)


@serve.deployment
class RetrieverDeployment:
    """Knowledge-base nodes ranked dense, BM25, or both fused by reciprocal rank
    (`serve.retrieval`), from the job's LanceDB table (`knowledge_base`: uri, table,
    fingerprint, cfg, language: `ray_ft.serve.app.knowledge_base_spec`)."""

    def __init__(self, knowledge_base: dict, node_group: NodeGroupConfig | str, embedder: DeploymentHandle,
                 timeout_s: float = 300.0, retries: int = 2, retrieval: dict | None = None):
        self.embedder, self.node_group = embedder, node_group
        self.timeout_s, self.retries = timeout_s, retries
        self.r = self._settings(retrieval or {"mode": "dense"})
        self.store = LanceIndex(knowledge_base, self.r)
        self.opened = False
        self._build: asyncio.Future | None = None

    @staticmethod
    def _settings(retrieval: dict) -> RetrievalSettings:
        r = RetrievalSettings.model_validate(retrieval)
        if r.mode == "auto":
            raise ValueError("retrieval mode 'auto' must be resolved for the job's language first "
                             "(ServeConfig.retrieval_for)")
        return r

    def reconfigure(self, user_config: dict) -> None:
        """Serve's user_config {"retrieval": {...}}: the ranking (mode, candidates, rrf_k,
        query_instruction) changed on running replicas by `serve deploy`, with no restart and no
        reopening of the table. Invalid settings raise, so Serve keeps the replica's old ones."""
        if "retrieval" in user_config:
            self.r = self.store.r = self._settings(user_config["retrieval"])

    async def _embed(self, texts: list[str], timeout_s: float) -> np.ndarray:
        return await call_with_retries(lambda: self.embedder.embed.remote(texts), "embedder",
                                       Deadline(timeout_s), self.retries)

    async def _open_table(self) -> None:
        await asyncio.to_thread(self.store.open)
        self.opened = True

    def _index_build(self) -> asyncio.Future:
        """The one opening of the table, started on first need. It runs apart from the request
        that started it: a request cancelled at its deadline does not cancel it (a table on
        object storage may open slower than a request's deadline)."""
        if self._build is None:
            self._build = asyncio.ensure_future(self._open_table())
            self._build.add_done_callback(self._forget_failed_build)
        return self._build

    def _forget_failed_build(self, build: asyncio.Future) -> None:
        if build.cancelled() or build.exception() is not None:
            self._build = None  # the next request or health check starts over

    async def check_health(self) -> None:
        """Serve calls this every few seconds from the replica's start: a new replica
        (autoscaled, or replacing a dead one) opens the table before its first request."""
        self._index_build()

    async def _built(self) -> None:
        await asyncio.shield(self._index_build())

    async def ready(self) -> dict:
        await self._built()
        return {"nodes": self.store.size(), "mode": self.r.mode, "table_version": self.store.kb.table.version}

    async def retrieve(self, query: str, top_k: int):
        await self._built()  # not ready(): its node count is a table scan on the LanceDB store
        if self.r.mode == "bm25":
            return await asyncio.to_thread(self.store.text, query, top_k)
        qvec = (await self._embed([self.r.query_instruction + query], self.timeout_s))[0]
        if self.r.mode == "dense":
            return await asyncio.to_thread(self.store.dense, qvec, top_k)
        return await asyncio.to_thread(self.store.hybrid, qvec, query, top_k)

    # -- live updates ---------------------------------------------------------------------

    async def add_documents(self, documents: list[dict]) -> dict:
        """Cut `documents` ({id, text, metadata}) into nodes of the served node group, embed them
        (the embedder deployment, within the request's deadline) and write them to the table."""
        await self._built()
        kb = self.store.kb
        nodes = build_nodes([{"passage_id": d["id"], "text": d["text"],
                              "metadata": {**d.get("metadata", {}), "document": d["id"]}} for d in documents],
                            self.node_group)
        if not nodes:
            return {"documents": 0, "nodes": 0, "removed_nodes": 0, "version": kb.table.version}
        vecs = await self._embed([n["text"] for n in nodes], self.timeout_s)
        return await asyncio.to_thread(kb.replace_documents, nodes, vecs)

    async def delete_document(self, document_id: str) -> dict:
        await self._built()
        kb = self.store.kb
        gone = await asyncio.to_thread(kb.delete_documents, [document_id])
        return {"id": document_id, "deleted_nodes": gone, "version": kb.table.version}
