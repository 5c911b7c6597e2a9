"""`data.documents` -> a QA corpus: documents read on Ray Data, cut into nodes, QA pairs written per
node by an LLM and filtered; the pairs then take the place of `data.source`.

The written pairs are cached under `run_dir/generate/` by everything they depend on (the
documents' bytes, the node settings, the generation settings, the writer model), so a prepare
rerun for another cutoff or split does not ask the LLM again. `data/generated_qa.jsonl` holds
them as QA rows (`question, context, answer`, plus `node_id, document, page, heading`): a file
the qa_rows reader reads, so an edited copy can be a `data.source`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.data.documents import list_documents, read_documents
from ray_ft.data.nodes import document_nodes
from ray_ft.data.qa import AnswerChecker, read_qa_rows
from ray_ft.data.qa_generation import generate_qa
from ray_ft.data.readers import SourceData
from ray_ft.data.records import passage_id_of
from ray_ft.data.sources import Problems, ReadReport, folder_fingerprint, source_fingerprint
from ray_ft.data.split import seeded_sample
from ray_ft.io import read_jsonl, write_jsonl_atomic, write_text_atomic

log = logging.getLogger(__name__)

GENERATED_FILE = "generated_qa.jsonl"


@dataclass
class GeneratedCorpus:
    """The generated QA pairs (as the qa_rows reader reads them), every node as a knowledge-base
    document, and what reading and generation counted."""

    rows: list[dict]
    source: SourceData
    kb_docs: list[dict]
    stats: dict


def documents_fingerprint(cfg: JobConfig) -> str:
    """The documents' names and bytes (size + mtime for remote ones)."""
    h = hashlib.sha256()
    for src, name in list_documents(cfg.data.documents):
        h.update(f"{name}\0".encode())
        h.update(hashlib.sha256(source_fingerprint(src)).digest())
    return h.hexdigest()


def generation_key(cfg: JobConfig) -> str:
    d, gen = cfg.data, cfg.data.qa_generation
    writer = "endpoint" if gen.endpoint else (gen.model or cfg.model.name)
    keys = {"documents": documents_fingerprint(cfg), "nodes": d.document_nodes.model_dump(),
            "generation": gen.model_dump(), "language": d.language, "seed": d.seed,
            "system_prompt": cfg.model.system_prompt, "vllm": cfg.serve.vllm.model_dump(),
            "writer": hashlib.sha256(folder_fingerprint(writer)).hexdigest()}
    return hashlib.sha256(json.dumps(keys, sort_keys=True, default=str).encode()).hexdigest()[:16]


def generated_corpus(cfg: JobConfig) -> GeneratedCorpus:
    """Read the documents, cut them into nodes and write (or reuse) the QA pairs."""
    d, gen = cfg.data, cfg.data.qa_generation
    docs, report = read_documents(d.documents, d.on_error)
    nodes = [n for doc in docs for n in document_nodes(doc, d.document_nodes)]
    asked = seeded_sample(nodes, lambda n: n["node_id"], gen.max_nodes, d.seed)
    order = {n["node_id"]: i for i, n in enumerate(nodes)}
    asked.sort(key=lambda n: order[n["node_id"]])  # document order, as the documents list them
    rows, counts = _cached_generation(cfg, asked)
    source = _as_source(rows, d.on_error, cfg.run_dir / "generate" / GENERATED_FILE)
    kb_docs, seen = [], set()
    for n in nodes:  # the knowledge base is every node: retrieval must find the right one among all
        pid = passage_id_of(n["text"])
        if pid not in seen:
            seen.add(pid)
            kb_docs.append({"passage_id": pid, "text": n["text"], "metadata": {"node_id": n["node_id"], **n["metadata"]}})
    # the counts' own "nodes" is the nodes asked; here "nodes" is every node of the documents
    stats = {**counts, "documents": asdict(report), "nodes": len(nodes), "knowledge_base_nodes": len(kb_docs),
             "nodes_asked": len(asked), "writer": _writer_name(cfg)}
    return GeneratedCorpus(rows, source, kb_docs, stats)


def _writer_name(cfg: JobConfig) -> str:
    gen = cfg.data.qa_generation
    if gen.endpoint:
        return f"endpoint {gen.endpoint.base_url} ({gen.endpoint.model})"
    return f"vLLM in Ray Data ({gen.model or cfg.model.name})"


def _cached_generation(cfg: JobConfig, nodes: list[dict]) -> tuple[list[dict], dict]:
    from ray_ft.models import resolve_model
    from ray_ft.data.qa_writers import writer_for

    cache = cfg.run_dir / "generate"
    key = generation_key(cfg)
    meta_file, rows_file = cache / "generation.json", cache / GENERATED_FILE
    try:
        meta = json.loads(meta_file.read_text())
        if meta["key"] == key and rows_file.is_file():
            log.info("reusing %s (same documents and generation settings)", rows_file)
            return read_jsonl(rows_file), {**meta["counts"], "reused": True}
    except (OSError, ValueError, KeyError):
        pass
    gen = cfg.data.qa_generation
    model_dir = None if gen.endpoint else str(resolve_model(gen.model or cfg.model.name))
    rows, counts = generate_qa(nodes, writer_for(cfg, model_dir), gen, cfg.data.language)
    write_jsonl_atomic(rows_file, rows)
    write_text_atomic(meta_file, json.dumps({"key": key, "counts": counts.to_dict()}, indent=2, ensure_ascii=False))
    log.info("generated %d QA pairs from %d nodes in %.0f s", counts.kept, len(nodes), counts.wall_s)
    return rows, {**counts.to_dict(), "reused": False}


def _as_source(rows: list[dict], on_error: str, name: Path) -> SourceData:
    """The pairs through the qa_rows reader: the same checks an edited copy would get as data.source."""
    report = ReadReport(format="qa_rows")
    records = read_qa_rows(str(name), [(f"line {n}", r) for n, r in enumerate(rows, start=1)],
                           Problems(on_error, report), AnswerChecker("repair", report))
    return SourceData("qa_rows", report, qa=records)
