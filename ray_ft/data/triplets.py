"""Embedding data: QA pairs from a CSV (Financial-QA-10k layout) and FlagEmbedding triplets.

A CSV needs `question` and `context` columns (others, e.g. `answer`, `ticker`, are ignored). A
triplet JSONL has one `{query, pos: [...], neg: [...]}` object per line (`prompt`, `pos_scores`,
`neg_scores`, `type` optional), as FlagEmbedding reads it. A bad row or line raises a one-line
error naming the file, the line and the field; `on_error="skip"` skips it and counts instead.
Sources may be local paths or pyarrow filesystem URIs.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ray_ft.data.qa import csv_rows
from ray_ft.data.sources import Problems, ReadReport, RecordError, read_text
from ray_ft.data.split import split_by_group
from ray_ft.errors import RayFTError
from ray_ft.io import jsonl_lines

DEFAULT_QUERY_PROMPT = "Represent this sentence for searching relevant passages: "


@dataclass(frozen=True)
class QAPair:
    line: int  # 1-based line where the CSV record starts (header is line 1)
    question: str
    context: str
    answer: str


def read_qa_csv(source: str | Path, on_error: str = "raise") -> tuple[list[QAPair], int]:
    """(pairs, skipped). Fields are stripped; `answer` is optional."""
    name = str(source)
    problems = Problems(on_error, ReadReport())
    pairs = []
    for where, row in csv_rows(name, read_text(name), ("question", "context")):
        try:
            if isinstance(row, RecordError):
                raise row
            q, c = row.get("question") or "", row.get("context") or ""
            bad = "question" if not q else "context" if not c else None
            if bad:
                raise RecordError(f"field '{bad}' is empty")
        except RecordError as err:
            problems.bad(f"{name}: {where}: {err}")
            continue
        pairs.append(QAPair(int(where.split()[-1]), q, c, row.get("answer") or ""))
    if not pairs:
        raise RayFTError(f"{name}: no usable rows")
    return pairs, problems.report.skipped_records


def split_pairs(pairs: list[QAPair], test_size: float, seed: int) -> tuple[list[QAPair], list[QAPair]]:
    """Seeded train/test split by context, so no passage is both trained on and retrieved in test."""
    return split_by_group(pairs, lambda p: p.context, test_size, seed)


def build_triplets(pairs: list[QAPair], neg_num: int, seed: int, prompt: str = DEFAULT_QUERY_PROMPT,
                   negatives_of: Callable[[QAPair], list[str]] | None = None) -> list[dict]:
    """One `{query, pos, neg, prompt[, answer]}` per pair: pos = its context; neg = `negatives_of(pair)`
    (mined), else `neg_num` distinct random contexts of other pairs, never equal to the positive
    (one seeded draw over the pairs sorted by text, so independent of input order)."""
    contexts = sorted({p.context for p in pairs})
    if negatives_of is None and len(contexts) <= neg_num:
        raise RayFTError(f"{len(contexts)} distinct contexts cannot give {neg_num} negatives per query")
    rng = random.Random(seed)
    out = []
    for p in sorted(pairs, key=lambda p: (p.question, p.context)):
        neg = negatives_of(p) if negatives_of else random_negatives(contexts, {p.context}, neg_num, rng)
        row = {"query": p.question, "pos": [p.context], "neg": neg, "prompt": prompt}
        if p.answer:  # kept for LM-supervised retrieval (FlagEmbedding ignores extra keys)
            row["answer"] = p.answer
        out.append(row)
    return out


def random_negatives(candidates: list[str], exclude: set[str], n: int, rng: random.Random) -> list[str]:
    """n distinct candidates not in `exclude` (a subset of `candidates`), drawn with `rng`."""
    if len(candidates) - len(exclude) < n:
        raise RayFTError(f"{len(candidates) - len(exclude)} candidate passages cannot give {n} negatives")
    neg: list[str] = []
    while len(neg) < n:
        c = candidates[rng.randrange(len(candidates))]
        if c not in exclude and c not in neg:
            neg.append(c)
    return neg


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
    if set(obj["pos"]) & set(obj["neg"]):
        return "field 'neg' contains a positive"
    for key in ("pos_scores", "neg_scores"):
        scores, items = obj.get(key), obj[key.split("_")[0]]
        if scores is not None and (not isinstance(scores, list) or len(scores) != len(items)):
            return f"field '{key}' must be a list as long as '{key.split('_')[0]}'"
    return None


def read_triplets_jsonl(source: str | Path, on_error: str = "raise") -> tuple[list[dict], int]:
    """(triplets, skipped) from a FlagEmbedding triplet file; each keeps its 1-based `line`."""
    name = str(source)
    problems = Problems(on_error, ReadReport())
    out = []
    for n, line in enumerate(jsonl_lines(read_text(name)), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            problem = _check_triplet(obj)
        except json.JSONDecodeError as err:
            problem = f"invalid JSON at column {err.colno}: {err.msg}"
        if problem:
            problems.bad(f"{name}: line {n}: {problem}")
            continue
        out.append({**obj, "line": n})
    if not out:
        raise RayFTError(f"{name}: no usable triplets")
    return out, problems.report.skipped_records


def pairs_of_triplets(triplets: list[dict]) -> list[QAPair]:
    """(query, first positive) pairs, to split a triplet file by context and score retrieval."""
    return [QAPair(t["line"], t["query"], t["pos"][0], "") for t in triplets]
