"""The data stage of `task: embedding`: QA pairs -> splits -> FlagEmbedding triplets.

CSV, a QA source of the SFT readers (SQuAD JSON, QA rows), or a FlagEmbedding triplet JSONL
(whose negatives are kept) -> test split by context (the
retrieval eval) -> validation split by context (during training) -> triplets with random or mined
hard negatives for the rest -> a seeded shuffle. Written to `embed/data/` with a manifest
(counts, config hash, file hashes), temp folder first.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import ray_ft
from ray_ft.config import JobConfig
from ray_ft.data.sources import source_fingerprint, suffix_of
from ray_ft.data.split import seeded_sample
from ray_ft.errors import RayFTError
from ray_ft.data.triplets import (
    QAPair, build_triplets, pairs_of_triplets, read_qa_csv, read_triplets_jsonl, split_pairs,
)
from ray_ft.io import read_jsonl, staged_dir, write_jsonl_atomic, write_text_atomic


@dataclass(frozen=True)
class EmbedData:
    root: Path
    triplets: list[dict]
    test: list[QAPair]
    val: list[QAPair]
    manifest: dict


def embed_config_hash(cfg: JobConfig) -> str:
    e = cfg.embed
    keys = ("source", "on_error", "test_size", "seed", "neg_num", "hard_negatives", "query_instruction",
            "max_train_samples", "val_size", "val_max_queries", "model")
    # The layout version: bumped when the written files change shape (2: triplets keep answers).
    h = hashlib.sha256(json.dumps({"layout": 2, "ray_ft": ray_ft.__version__, **{k: e.model_dump()[k] for k in keys}}, sort_keys=True).encode())
    h.update(hashlib.sha256(source_fingerprint(e.source)).digest())
    if excludes_sft_heldout(cfg):
        from ray_ft.data.prepare import heldout_split_fingerprint

        h.update(heldout_split_fingerprint(cfg).encode())
    return h.hexdigest()[:16]


def excludes_sft_heldout(cfg: JobConfig) -> bool:
    """The embed stage of an sft job (embed.enabled) leaves out the SFT eval passages."""
    return cfg.task == "sft" and cfg.embed.enabled


def read_qa_pairs(source: str, on_error: str) -> tuple[list[QAPair], int]:
    """(pairs, skipped) of a QA source in an SFT format (SQuAD JSON such as CMRC2018, QA rows,
    `hf://`), read and validated by the SFT readers; `line` is the record's 1-based position."""
    from ray_ft.data.readers import read_source

    data = read_source(source, "auto", on_error)
    if not data.is_qa:
        raise RayFTError(f"{source}: {data.format} data has no passages; embed.source needs QA pairs "
                         "(a CSV with question/context, SQuAD JSON, QA rows) or FlagEmbedding triplets")
    pairs = [QAPair(i, r.question, r.context, r.answers[0] if r.answers else "") for i, r in enumerate(data.qa, 1)]
    return pairs, data.report.skipped_records


def prepare_embedding_data(cfg: JobConfig, out: Path) -> EmbedData:
    e = cfg.embed
    given = None  # triplets read from a FlagEmbedding JSONL source (its negatives kept as they are)
    if suffix_of(e.source) == ".jsonl":
        given, skipped = read_triplets_jsonl(e.source, e.on_error)
        pairs = pairs_of_triplets(given)
    elif suffix_of(e.source) == ".csv":
        pairs, skipped = read_qa_csv(e.source, e.on_error)
    else:
        pairs, skipped = read_qa_pairs(e.source, e.on_error)
    train, test = split_pairs(pairs, e.test_size, e.seed)
    excluded = 0
    if excludes_sft_heldout(cfg):
        from ray_ft.data.prepare import heldout_contexts

        heldout = heldout_contexts(cfg)
        kept = [p for p in train if p.context.strip() not in heldout]
        train, excluded = kept, len(train) - len(kept)
    train, held = split_pairs(train, e.val_size, e.seed + 1) if e.val_size else (train, [])
    held = seeded_sample(held, lambda p: f"{p.line}", e.val_max_queries, e.seed)
    mining = None
    if given is not None:
        keep = {p.line for p in train}
        triplets = [{k: v for k, v in t.items() if k != "line"} for t in given if t["line"] in keep]
    else:
        negatives_of = None
        if e.hard_negatives.enabled:
            from ray_ft.data.hard_negatives import mine_hard_negatives
            from ray_ft.models import resolve_model

            mined, mining = mine_hard_negatives(train, e.neg_num, e.seed, e.hard_negatives,
                                                str(resolve_model(e.hard_negatives.model or e.model)),
                                                cfg.data.num_workers)
            negatives_of = lambda p: mined[(p.question, p.context)]  # noqa: E731
        triplets = build_triplets(train, e.neg_num, e.seed, e.query_instruction, negatives_of)
    # Seeded shuffle (build_triplets returns them sorted by question): the trainer reads them in
    # this order, and a max_steps run must see a random slice, not the alphabetical first part.
    triplets = seeded_sample(triplets, lambda t: t["query"] + "\0" + t["pos"][0], e.max_train_samples, e.seed)
    manifest = {"source": e.source, "config_hash": embed_config_hash(cfg), "skipped_rows": skipped,
                "pairs": len(pairs), "excluded_sft_heldout_pairs": excluded, "train_pairs": len(train), "test_pairs": len(test),
                "val_pairs": len(held), "triplets": len(triplets), "neg_num": e.neg_num,
                "negatives": "given" if given is not None else "mined" if mining else "random",
                **({"hard_negatives": mining} if mining else {})}
    with staged_dir(out) as tmp:
        write_jsonl_atomic(tmp / "train.jsonl", triplets)
        write_jsonl_atomic(tmp / "test.jsonl", [{"query": p.question, "pos": [p.context], "line": p.line} for p in test])
        write_jsonl_atomic(tmp / "val.jsonl", [{"query": p.question, "pos": [p.context], "line": p.line} for p in held])
        write_text_atomic(tmp / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False))
    return EmbedData(out, triplets, test, held, manifest)


def load_embedding_data(cfg: JobConfig, out: Path) -> EmbedData | None:
    """The prepared embedding data when it exists for exactly this config and input."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if manifest.get("config_hash") != embed_config_hash(cfg):
        return None
    pair = lambda r: QAPair(r["line"], r["query"], r["pos"][0], "")  # noqa: E731
    return EmbedData(out, read_jsonl(out / "train.jsonl"), [pair(r) for r in read_jsonl(out / "test.jsonl")],
                     [pair(r) for r in read_jsonl(out / "val.jsonl")], manifest)
