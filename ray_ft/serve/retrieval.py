"""Lexical retrieval, hybrid fusion and a dense index persisted on disk, beside the exact-cosine
`VectorIndex` (`ray_ft.serve.engines`).

- `BM25Index`: Okapi BM25 over words (Latin scripts, lower-cased) and, for CJK text, character
  unigrams and bigrams (Chinese has no spaces; bigrams keep most two-character words together).
- `reciprocal_rank_fusion`: combine rankings by sum of 1 / (k + rank) (Cormack et al., 2009), which
  needs no calibration between BM25 scores and cosines.
- `save_index` / `load_index`: the node vectors with a fingerprint of the nodes and of the
  embedder; a saved index is reused only when both match, so a changed knowledge base, node
  group or embedder is re-embedded, never served stale.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from pathlib import Path

import numpy as np

from ray_ft.serve.protocols import Hit

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+", re.UNICODE)


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased words; a CJK run gives its characters and its character bigrams."""
    out = []
    for run in _TOKEN.findall(text.lower()):
        if re.match(rf"[{_CJK}]", run):
            out += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            out.append(run)
    return out


class BM25Index:
    """Okapi BM25 (k1, b) with the Lucene idf, log(1 + (N - df + 0.5) / (df + 0.5)), never negative."""

    def __init__(self, nodes: list[dict], k1: float = 1.5, b: float = 0.75):
        self.nodes, self.k1, self.b = nodes, k1, b
        self.docs = [Counter(lexical_tokens(n["text"])) for n in nodes]
        self.lengths = np.array([sum(d.values()) for d in self.docs], dtype=np.float64)
        self.avg_len = float(self.lengths.mean()) if len(nodes) else 0.0
        df = Counter(t for d in self.docs for t in d)
        n = len(nodes)
        self.idf = {t: math.log(1 + (n - f + 0.5) / (f + 0.5)) for t, f in df.items()}
        self.postings: dict[str, list[tuple[int, int]]] = {}
        for i, d in enumerate(self.docs):
            for t, tf in d.items():
                self.postings.setdefault(t, []).append((i, tf))

    def scores(self, query: str) -> np.ndarray:
        scores = np.zeros(len(self.nodes))
        norm = self.k1 * (1 - self.b + self.b * self.lengths / (self.avg_len or 1.0))
        for t in set(lexical_tokens(query)):
            for i, tf in self.postings.get(t, ()):
                scores[i] += self.idf[t] * tf * (self.k1 + 1) / (tf + norm[i])
        return scores

    def search(self, query: str, top_k: int) -> list[Hit]:
        scores = self.scores(query)
        order = np.argsort(-scores, kind="stable")[:top_k]
        return [_hit(self.nodes[i], float(scores[i])) for i in order if scores[i] > 0]


def reciprocal_rank_fusion(rankings: list[list[Hit]], top_k: int, k: int = 60) -> list[Hit]:
    """Nodes ranked by sum over rankings of 1 / (k + rank), rank from 1; ties keep first-seen order."""
    fused: dict[str, float] = {}
    first: dict[str, Hit] = {}
    for ranking in rankings:
        for rank, hit in enumerate(ranking, start=1):
            fused[hit.node_id] = fused.get(hit.node_id, 0.0) + 1.0 / (k + rank)
            first.setdefault(hit.node_id, hit)
    order = sorted(fused, key=lambda node_id: -fused[node_id])[:top_k]
    return [Hit(n, first[n].text, fused[n], first[n].metadata) for n in order]


def _hit(node: dict, score: float) -> Hit:
    return Hit(node["node_id"], node["text"], score, node.get("metadata", {}))


def nodes_fingerprint(nodes: list[dict], embedder_id: str) -> str:
    """Changes when any node's id or text, their order, or the embedder changes."""
    h = hashlib.sha256(embedder_id.encode())
    for n in nodes:
        h.update(b"\0" + n["node_id"].encode() + b"\1" + n["text"].encode())
    return h.hexdigest()


def save_index(folder: Path, fingerprint: str, vectors: np.ndarray) -> None:
    """Vectors then the manifest, each written to a temp name and renamed, so a reader never sees
    a manifest without its vectors. Temp names carry the pid: retriever replicas may save at once."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"vectors.{os.getpid()}.tmp.npy"
    np.save(tmp, np.asarray(vectors, dtype=np.float32))
    tmp.replace(folder / "vectors.npy")
    manifest = folder / f"index.{os.getpid()}.json.tmp"
    manifest.write_text(json.dumps({"fingerprint": fingerprint, "count": int(len(vectors)),
                                    "dim": int(vectors.shape[1])}))
    manifest.replace(folder / "index.json")


def load_index(folder: Path, fingerprint: str) -> np.ndarray | None:
    """The saved vectors when the folder holds an index of exactly these nodes and embedder."""
    try:
        meta = json.loads((folder / "index.json").read_text())
        if meta["fingerprint"] != fingerprint:
            return None
        vectors = np.load(folder / "vectors.npy")
    except (OSError, ValueError, KeyError):
        return None
    return vectors if vectors.shape == (meta["count"], meta["dim"]) else None
