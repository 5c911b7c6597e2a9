"""The knowledge base: documents (held-out passages and plain-text files) and their retrieval
nodes, cut by named node groups (per passage, line, sentence, or fixed chunks with overlap).

A node is `{node_id, text, metadata: {passage_id, ...}}`; node ids are stable (`pid`, `pid:LINE`,
`pid:sSENTENCE`, `pid:cCHUNK`) so evaluation can tell which passage a node came from.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from ray_ft.config import NodeGroupConfig
from ray_ft.data.records import passage_id_of
from ray_ft.data.sources import decode_text, is_uri, read_bytes
from ray_ft.errors import RayFTError

TEXT_SUFFIXES = (".txt", ".md")
# A sentence ends at CJK/full-width end punctuation, or at . ! ? followed by whitespace.
_SENTENCE_END = re.compile(r"(?<=[。！？；])|(?<=[.!?;])\s+")


def read_text_documents(sources: list[str]) -> list[dict]:
    """One document `{passage_id, text, source}` per file; a folder contributes its .txt/.md files
    (sorted, recursively). Empty files, missing paths and non-UTF-8 bytes are one-line errors."""
    docs = []
    for src in sources:
        if not is_uri(src) and Path(src).is_dir():
            files = sorted(str(p) for p in Path(src).rglob("*") if p.suffix.lower() in TEXT_SUFFIXES)
            if not files:
                raise RayFTError(f"{src}: no .txt or .md files in this folder")
        else:
            files = [src]
        for f in files:
            text = decode_text(f, read_bytes(f)).strip()
            docs.append({"passage_id": passage_id_of(text), "text": text, "source": f})
    return docs


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def chunk_spans(text: str, size: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) character windows of `size` that overlap by `overlap`; the last one ends at
    the text's end (it may be shorter)."""
    step = size - overlap
    spans, start = [], 0
    while True:
        spans.append((start, min(start + size, len(text))))
        if start + size >= len(text):
            return spans
        start += step


def build_nodes(documents: list[dict], group: NodeGroupConfig | str) -> list[dict]:
    """Documents `{passage_id, text}` -> retrieval nodes of one node group."""
    group = NodeGroupConfig(kind=group) if isinstance(group, str) else group
    nodes = []
    for doc in documents:
        pid, text = doc["passage_id"], doc["text"]
        meta = {**doc.get("metadata", {}), "passage_id": pid}  # a document node's place comes along
        if group.kind == "passage":
            nodes.append({"node_id": pid, "text": text, "metadata": meta})
        elif group.kind == "line":
            for i, line in enumerate(ln.strip() for ln in text.splitlines()):
                if line:
                    nodes.append({"node_id": f"{pid}:{i}", "text": line, "metadata": meta})
        elif group.kind == "sentence":
            for i, sent in enumerate(split_sentences(text)):
                nodes.append({"node_id": f"{pid}:s{i}", "text": sent, "metadata": meta})
        else:
            for i, (a, b) in enumerate(chunk_spans(text, group.chunk_size, group.chunk_overlap)):
                nodes.append({"node_id": f"{pid}:c{i}", "text": text[a:b], "metadata": {**meta, "start": a}})
    return nodes


def node_id_of(document: str, offset: int) -> str:
    """A document node's id: stable across runs and machines (the document's listed name and the
    node's character offset in it), so generated questions and caches keep pointing at it."""
    return hashlib.sha1(f"{document}\0{offset}".encode("utf-8")).hexdigest()[:16]


def _pieces(text: str, group: NodeGroupConfig) -> list[tuple[int, str]]:
    """(offset in `text`, piece) of one section cut by the node group."""
    if group.kind == "passage":
        return [(0, text)]
    if group.kind == "chunk":
        return [(a, text[a:b]) for a, b in chunk_spans(text, group.chunk_size, group.chunk_overlap)]
    parts = [ln.strip() for ln in text.splitlines()] if group.kind == "line" else split_sentences(text)
    out, pos = [], 0
    for part in (p for p in parts if p):
        at = text.find(part, pos)
        out.append((at, part))
        pos = at + len(part)
    return out


def document_nodes(doc, group: NodeGroupConfig) -> list[dict]:
    """The nodes of a `Document`, cut within each section (a PDF page, the text under one
    heading), each `{node_id, text, metadata: {document, source, kind, start, page?, heading?}}`."""
    nodes = []
    for sec in doc.sections:
        for offset, piece in _pieces(sec.text, group):
            piece = piece.strip()
            if not piece:
                continue
            meta = {"document": doc.name, "source": doc.source, "kind": doc.kind, "start": sec.start + offset}
            if sec.page is not None:
                meta["page"] = sec.page
            if sec.heading:
                meta["heading"] = sec.heading
            nodes.append({"node_id": node_id_of(doc.name, sec.start + offset), "text": piece, "metadata": meta})
    return nodes
