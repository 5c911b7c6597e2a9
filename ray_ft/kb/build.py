"""Building the knowledge-base table with Ray Data: nodes -> embedded on an actor pool -> merged
into the LanceDB table in commits of `write_every` nodes.

Resumable by construction: only the nodes the table lacks (new id, changed text, or no vector of
this embedder) are embedded, and each commit is a table version, so a build stopped half-way
keeps what it committed and its rerun embeds the rest. With `sync` the table is made to hold
exactly the given nodes (a job's rebuild); without it nodes are only added or replaced
(`ray-ft kb add`, live updates).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.kb.store import KnowledgeBase, embedder_fingerprint, node_row

log = logging.getLogger("ray_ft.kb")


@dataclass(frozen=True)
class KBBuild:
    """What a build did: the table, its vector column and version, and the work it took."""

    uri: str
    table: str
    fingerprint: str
    rows: int
    embedded: int
    removed: int
    version: int
    indexes: tuple[str, ...]
    seconds: float


class EmbedNodeRows:
    """Ray Data callable: node rows in, the same rows plus this embedder's unit `vector` out."""

    def __init__(self, model_dir: str, dtype: str, batch_size: int, threads: int, use_gpu: bool):
        import torch

        from ray_ft.embedder import SentenceTransformerEmbedder

        torch.set_num_threads(max(1, threads))
        self.embedder = SentenceTransformerEmbedder(model_dir, device="cuda" if use_gpu else "cpu",
                                                    batch_size=batch_size, dtype=dtype)

    def __call__(self, batch: dict) -> dict:
        return {**batch, "vector": self.embedder.embed([str(t) for t in batch["text"]])}


def embedded_batches(rows: list[dict], model_dir: str, dtype: str, cfg: KnowledgeBaseConfig):
    """(rows, vectors) in chunks of `write_every`, as the actor pool finishes them."""
    import ray

    from ray_ft.data.retrieval import local_path

    blocks = max(cfg.embed_workers, -(-len(rows) // (4 * cfg.embed_batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
        EmbedNodeRows, batch_size=cfg.embed_batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=cfg.embed_workers),
        num_cpus=cfg.embed_cpus, num_gpus=1 if cfg.embed_use_gpu else 0,
        fn_constructor_kwargs={"model_dir": local_path(model_dir), "dtype": dtype,
                               "batch_size": cfg.embed_batch_size, "threads": int(cfg.embed_cpus),
                               "use_gpu": cfg.embed_use_gpu})
    columns = list(rows[0])
    for batch in ds.iter_batches(batch_size=cfg.write_every, batch_format="numpy"):
        out = [{c: str(batch[c][i]) for c in columns} for i in range(len(batch["node_id"]))]
        yield out, np.asarray(batch["vector"], dtype=np.float32)


def job_table(cfg) -> tuple[str, str]:
    """(database URI, table) of a job's knowledge base: `serve.knowledge_base` or the run folder's
    knowledge_base.lance, one table per served node group. Absolute: Ray workers open it too."""
    kb = cfg.serve.knowledge_base
    uri = kb.uri if kb.uri and "://" in kb.uri else str((Path(kb.uri) if kb.uri else cfg.run_dir / "knowledge_base.lance").resolve())
    return uri, kb.table or f"nodes_{cfg.serve.node_group}"


def build_job_knowledge_base(cfg, documents: list[dict], embedder_dir: str) -> KBBuild:
    """The job's table brought to its knowledge-base documents cut by `serve.node_group`."""
    from ray_ft.data.nodes import build_nodes

    uri, table = job_table(cfg)
    nodes = build_nodes(documents, cfg.data.node_groups[cfg.serve.node_group])
    return build_knowledge_base(nodes, uri, table, embedder_dir, cfg.serve.embedder_dtype,
                                cfg.serve.knowledge_base, cfg.data.language, sync=True)


def check_job_knowledge_base(cfg, documents: list[dict], embedder_dir: str, job: str) -> None:
    """Raise unless the job's table holds every knowledge-base node with the served embedder's
    vectors: what a graph built without a build step (`serve run ...:app_builder`) needs."""
    from ray_ft.data.nodes import build_nodes
    from ray_ft.errors import RayFTError

    uri, table = job_table(cfg)
    nodes = build_nodes(documents, cfg.data.node_groups[cfg.serve.node_group])
    try:
        kb = KnowledgeBase(uri, table, embedder_fingerprint(embedder_dir, cfg.serve.embedder_dtype), None,
                           cfg.serve.knowledge_base, cfg.data.language, create=False)
        missing = len(kb.stale(nodes))
    except RayFTError:
        missing = len(nodes)
    if missing:
        raise RayFTError(f"{uri}/{table}: {missing} of {len(nodes)} knowledge-base nodes lack the served "
                         f"embedder's vectors; run `ray-ft kb build {job}` first")


def add_files(cfg, paths: list[str], embedder_dir: str) -> KBBuild:
    """`ray-ft kb add`: documents (PDF, HTML, Markdown, text; files, folders, globs, URIs) read
    on Ray Data, cut by `serve.node_group`, embedded and written; a document already in the table
    (same name) is replaced, its nodes that the new text no longer has removed."""
    from ray_ft.data.documents import read_documents
    from ray_ft.data.nodes import document_nodes

    docs, _ = read_documents(paths, cfg.data.on_error)
    group = cfg.data.node_groups[cfg.serve.node_group]
    nodes = [n for d in docs for n in document_nodes(d, group)]
    uri, table = job_table(cfg)
    return build_knowledge_base(nodes, uri, table, embedder_dir, cfg.serve.embedder_dtype, cfg.serve.knowledge_base,
                                cfg.data.language, sync=False, replaced=sorted({d.name for d in docs}))


def build_knowledge_base(nodes: list[dict], uri: str, table: str, embedder_dir: str, dtype: str = "float32",
                         cfg: KnowledgeBaseConfig | None = None, language: str = "en",
                         sync: bool = True, replaced: list[str] | None = None) -> KBBuild:
    """Bring the table to `nodes` (retrieval nodes {node_id, text, metadata}) for this embedder;
    `replaced`: documents whose earlier nodes that `nodes` no longer has are removed."""
    cfg = cfg or KnowledgeBaseConfig()
    start = time.perf_counter()
    fingerprint = embedder_fingerprint(embedder_dir, dtype)
    kb = KnowledgeBase(uri, table, fingerprint, None, cfg, language)
    removed = kb.delete_nodes_except({str(n["node_id"]) for n in nodes}) if sync else 0
    todo = [node_row(n) for n in kb.stale(nodes)]
    done = 0
    if todo:
        log.info("knowledge base %s/%s: embedding %d of %d nodes", uri, table, len(todo), len(nodes))
        for rows, vectors in embedded_batches(todo, embedder_dir, dtype, cfg):
            kb.upsert(rows, vectors)
            done += len(rows)
            log.info("knowledge base: %d/%d nodes embedded and committed", done, len(todo))
    if replaced:
        removed += kb.prune_documents(replaced, nodes)
    indexes = kb.ensure_indexes()
    s = kb.stats()
    return KBBuild(uri, table, fingerprint, s.rows, done, removed, s.version, indexes,
                   round(time.perf_counter() - start, 2))
