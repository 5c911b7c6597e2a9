"""Embedding as a Ray Data batch job on an actor pool, and exact top-n search.

Each actor loads the embedder once and embeds batches of texts; corpus and queries go through one
job (one pool start). The search is an exact dot product in the driver, in chunks of queries so
memory stays bounded (vectors are L2-normalised, so the dot product is the cosine): like
FlagEmbedding's hn_mine, which searches one index in one process. Used for RA-DIT augmentation
and hard-negative mining.
"""

from __future__ import annotations

import numpy as np

EMBED_BATCH = 64
SEARCH_CHUNK = 1024  # queries scored at once: a chunk x corpus score matrix


class EmbedBatch:
    """Ray Data callable: the unit vectors of a batch of texts."""

    def __init__(self, model_dir: str, threads: int = 1):
        import torch

        from ray_ft.embedder import SentenceTransformerEmbedder

        torch.set_num_threads(threads)
        self.embedder = SentenceTransformerEmbedder(model_dir, batch_size=EMBED_BATCH)

    def __call__(self, batch: dict) -> dict:
        return {"i": batch["i"], "vector": self.embedder.embed([str(t) for t in batch["text"]])}


def local_path(model_dir: str) -> str:
    """A local folder as an absolute path: Ray's actors do not run in the driver's folder."""
    from pathlib import Path

    return str(Path(model_dir).resolve()) if Path(model_dir).exists() else model_dir


def embed_texts(texts: list[str], model_dir: str, workers: int = 1) -> np.ndarray:
    """(len(texts), dim) float32 unit vectors, in input order, from `workers` actors."""
    import ray

    model_dir = local_path(model_dir)
    blocks = max(workers, -(-len(texts) // (4 * EMBED_BATCH)))
    ds = ray.data.from_items([{"i": i, "text": t} for i, t in enumerate(texts)], override_num_blocks=blocks)
    out = ds.map_batches(EmbedBatch, fn_constructor_kwargs={"model_dir": model_dir},
                         batch_size=EMBED_BATCH, batch_format="numpy",
                         compute=ray.data.ActorPoolStrategy(size=workers), num_cpus=1)
    ids, vecs = [], []
    for batch in out.iter_batches(batch_format="numpy", batch_size=None):
        ids.append(batch["i"])
        vecs.append(batch["vector"])
    order = np.argsort(np.concatenate(ids), kind="stable")  # blocks may come back in any order
    return np.concatenate(vecs)[order].astype(np.float32)


def embed_corpus_and_queries(corpus: list[str], queries: list[str], model_dir: str, query_prefix: str = "",
                             workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Vectors of the corpus and of the (prefixed) queries, from one embedding job."""
    vecs = embed_texts(list(corpus) + [query_prefix + q for q in queries], model_dir, workers)
    return vecs[: len(corpus)], vecs[len(corpus):]


def top_n(queries: np.ndarray, corpus: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and scores of the n best corpus rows per query, best first (ties: lower index)."""
    n = min(n, corpus.shape[0])
    all_ids, all_scores = [], []
    for start in range(0, len(queries), SEARCH_CHUNK):
        sims = queries[start:start + SEARCH_CHUNK] @ corpus.T
        part = np.argpartition(-sims, n - 1, axis=1)[:, :n]
        part_scores = np.take_along_axis(sims, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)
        all_ids.append(np.take_along_axis(part, order, axis=1).astype(np.int32))
        all_scores.append(np.take_along_axis(part_scores, order, axis=1).astype(np.float32))
    if not all_ids:
        return np.zeros((0, n), np.int32), np.zeros((0, n), np.float32)
    return np.concatenate(all_ids), np.concatenate(all_scores)
