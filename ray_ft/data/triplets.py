"""QA CSV corpora (Financial-QA-10k layout) and FlagEmbedding-format embedding triplets.

A CSV needs `question` and `context` columns (others, e.g. `answer`, `ticker`, are ignored). A
triplet JSONL has one `{query, pos: [...], neg: [...]}` object per line (`prompt`, `pos_scores`,
`neg_scores`, `type` optional), as FlagEmbedding reads it. A bad row or line raises a one-line
error naming the file, the line and the field; `on_error="skip"` skips it and counts instead.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ray_ft.data.split import split_by_group
from ray_ft.errors import RayFTError

DEFAULT_QUERY_PROMPT = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class QAPair:
    line: int  # 1-based line of the CSV record (header is line 1)
    question: str
    context: str
    answer: str


def read_qa_csv(path: Path, on_error: str = "raise") -> tuple[list[QAPair], int]:
    """(pairs, skipped). Fields are stripped; `answer` is optional."""
    if not path.is_file():
        raise RayFTError(f"{path}: file not found")
    pairs, skipped = [], 0
    try:
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            missing = {"question", "context"} - set(reader.fieldnames or [])
            if missing:
                raise RayFTError(f"{path}: header lacks column(s) {sorted(missing)}; found {reader.fieldnames}")
            for row in reader:
                line = reader.line_num
                q, c = (row.get("question") or "").strip(), (row.get("context") or "").strip()
                bad = "question" if not q else "context" if not c else None
                if bad:
                    if on_error == "skip":
                        skipped += 1
                        continue
                    raise RayFTError(f"{path}: line {line}: field '{bad}' is empty")
                pairs.append(QAPair(line, q, c, (row.get("answer") or "").strip()))
    except UnicodeDecodeError as err:
        raise RayFTError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except csv.Error as err:
        raise RayFTError(f"{path}: invalid CSV: {err}") from None
    if not pairs:
        raise RayFTError(f"{path}: no usable rows")
    return pairs, skipped


def split_pairs(pairs: list[QAPair], test_size: float, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """Seeded train/test split by context, so no passage is both trained on and retrieved in test."""
    return split_by_group(pairs, lambda p: p.context, test_size, seed)


def build_triplets(pairs: list[QAPair], neg_num: int, seed: int,
                   prompt: str = DEFAULT_QUERY_PROMPT) -> list[dict]:
    """One `{query, pos, neg, prompt}` per pair: pos = its context, `neg_num` distinct random
    contexts of other pairs, never equal to the positive (seeded; independent of input order)."""
    contexts = sorted({p.context for p in pairs})
    if len(contexts) <= neg_num:
        raise RayFTError(f"{len(contexts)} distinct contexts cannot give {neg_num} negatives per query")
    rng = random.Random(seed)
    out = []
    for p in sorted(pairs, key=lambda p: (p.question, p.context)):
        neg: list[str] = []
        while len(neg) < neg_num:
            c = contexts[rng.randrange(len(contexts))]
            if c != p.context and c not in neg:
                neg.append(c)
        out.append({"query": p.question, "pos": [p.context], "neg": neg, "prompt": prompt})
    return out


def _check_triplet(obj: object) -> str | None:
    """The first problem with one triplet line, or None."""
    if not isinstance(obj, dict):
        return "line is not a JSON object"
    if not isinstance(obj.get("query"), str) or not obj["query"].strip():
        return "field 'query' missing or empty"
    for key in ("pos", "neg"):
        items = obj.get(key)
        if not isinstance(items, list) or not items:
            return f"field '{key}' missing or not a non-empty list"
        if not all(isinstance(t, str) and t.strip() for t in items):
            return f"field '{key}' holds an empty or non-string passage"
    if obj["pos"][0] in obj["neg"]:
        return "field 'neg' contains the positive"
    return None


def read_triplets_jsonl(path: Path, on_error: str = "raise") -> tuple[list[dict], int]:
    """(triplets, skipped) from a FlagEmbedding triplet file; each keeps its 1-based `line`."""
    if not path.is_file():
        raise RayFTError(f"{path}: file not found")
    out, skipped = [], 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise RayFTError(f"{path}: not UTF-8 text (byte {err.start})") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            problem = _check_triplet(obj)
        except json.JSONDecodeError as err:
            problem = f"invalid JSON at column {err.colno}: {err.msg}"
        if problem:
            if on_error == "skip":
                skipped += 1
                continue
            raise RayFTError(f"{path}: line {n}: {problem}")
        out.append({**obj, "line": n})
    if not out:
        raise RayFTError(f"{path}: no usable triplets")
    return out, skipped


def pairs_of_triplets(triplets: list[dict]) -> list[QAPair]:
    """(query, first positive) pairs, to split a triplet file by context and score retrieval."""
    return [QAPair(t["line"], t["query"], t["pos"][0], "") for t in triplets]
