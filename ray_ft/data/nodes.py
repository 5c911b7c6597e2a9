"""The knowledge base: documents (held-out passages and plain-text files) and their retrieval
nodes, cut by named node groups (per passage, line, sentence, or fixed chunks with overlap).

A node is `{node_id, text, metadata: {passage_id, ...}}`; node ids are stable (`pid`, `pid:LINE`,
`pid:sSENTENCE`, `pid:cCHUNK`) so evaluation can tell which passage a node came from.
"""

from __future__ import annotations

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
        meta = {"passage_id": pid}
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
