"""The served retriever's ranking over a plain list of passages, for stages that need the first
stage's candidates outside the served graph (the reranker's training and test groups): the
passages go into a temporary LanceDB table and are searched as the retriever replicas search
the job's table (same modes, tokenizer, fusion)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable

import numpy as np

from ray_ft.config import RetrievalSettings
from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.kb.store import KnowledgeBase, node_row

EmbedFn = Callable[[list[str]], np.ndarray]


def table_search(r: RetrievalSettings, embed: EmbedFn | None, kb_cfg: KnowledgeBaseConfig, language: str):
    """A `Search` (questions, passages, n) -> each question's passage indices, best first, ranked
    by `r.mode` (dense, bm25 or hybrid; `embed` is unused for bm25). BM25 returns fewer than n
    where fewer passages share a term with the question, as the served retriever does."""
    if r.mode not in ("dense", "bm25", "hybrid"):
        raise ValueError(f"retrieval mode {r.mode!r} must be resolved for the language first")

    def search(questions: list[str], passages: list[str], n: int) -> list[list[int]]:
        with tempfile.TemporaryDirectory(prefix="ray_ft_first_stage_") as tmp:
            kb = KnowledgeBase(tmp, "passages", "first_stage", None, kb_cfg.model_copy(update={"refresh_s": 0}),
                               language)
            rows = [node_row({"node_id": str(i), "text": p, "metadata": {}}) for i, p in enumerate(passages)]
            vectors = np.zeros((len(passages), 1), np.float32) if r.mode == "bm25" else embed(passages)
            kb.upsert(rows, vectors)
            kb.ensure_indexes()
            if r.mode == "bm25":
                return [[int(h.node_id) for h in kb.text(q, n)] for q in questions]
            qvecs = embed([r.query_instruction + q for q in questions])
            if r.mode == "dense":
                return [[int(h.node_id) for h in kb.dense(v, n)] for v in qvecs]
            # as served: fuse each ranking's top `candidates`
            return [[int(h.node_id) for h in kb.hybrid(v, q, n, r.candidates, r.rrf_k)] for v, q in zip(qvecs, questions)]

    return search
