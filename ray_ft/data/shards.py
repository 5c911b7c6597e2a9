"""The training set on Ray Data: build examples (template, tokenize, fit into cutoff_len) on an
actor pool, keep those that fit, select a seeded sample, pack, and write parquet shards.

Examples are built in a seeded order (a per-id hash of the seed, so it does not depend on the
input order) and Ray Data keeps that order (`preserve_order`); the selection is the first
`max_samples` that fit, packing packs windows of that order, so the same seed and input give
byte-identical shards.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ray_ft.data.examples import TRAIN_SCHEMA, BuildBatch, ExampleSettings
from ray_ft.data.packing import pack_table
from ray_ft.data.split import order_key

PACK_WINDOW = 512  # examples packed together; larger windows pack tighter but hold more in memory
BUILD_BATCH = 256  # rows per build task: fewer, larger blocks keep Ray's per-task overhead small


@dataclass(frozen=True)
class ShardPlan:
    settings: ExampleSettings
    model_dir: str
    max_samples: int | None
    packing: bool
    num_shards: int
    num_workers: int
    packing_len: int | None = None  # tokens per packed row (None: cutoff_len)


def build_examples(rows: list[dict], plan: ShardPlan):
    """Ray Dataset of built examples (BUILT_SCHEMA) in the seeded order, materialized.

    The rows are put in their seeded order first (the key is a hash of the id, cheap to compute
    in the driver), so that the build keeps the order and no distributed sort is needed."""
    import ray

    ordered = sorted(rows, key=lambda r: order_key(plan.settings.seed, str(r["id"])))
    blocks = max(plan.num_workers, -(-len(ordered) // BUILD_BATCH))
    return ray.data.from_items(ordered, override_num_blocks=blocks).map_batches(
        BuildBatch, fn_constructor_kwargs={"model_dir": plan.model_dir, "settings": plan.settings},
        batch_size=BUILD_BATCH, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=plan.num_workers), num_cpus=1,
    ).materialize()


def name_parts(folder: Path) -> None:
    """part-00000.parquet, ...: Ray names files after the dataset's random id; fixed names make
    equal runs equal folders."""
    for i, f in enumerate(sorted(folder.glob("*.parquet"))):
        f.rename(folder / f"part-{i:05d}.parquet")


def write_train_set(rows: list[dict], plan: ShardPlan, out_dir: Path, sft_file: Path, source: str) -> dict:
    """Write `out_dir/*.parquet` and `sft_file`; return the manifest's training numbers."""
    import ray

    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True  # order kept -> same shards
    try:
        return _write_train_set(rows, plan, out_dir, sft_file, source)
    finally:
        options.preserve_order = before


def _write_train_set(rows: list[dict], plan: ShardPlan, out_dir: Path, sft_file: Path, source: str) -> dict:
    import ray

    from ray_ft.errors import RayFTError

    built = build_examples(rows, plan)
    summary = pa.concat_tables(ray.get(built.select_columns(["status", "num_tokens"]).to_arrow_refs()))
    statuses = Counter(summary.column("status").to_pylist())
    all_lengths = summary.column("num_tokens").to_pylist()
    # The selection is the first max_samples examples that fit, in the seeded order.
    picked = [i for i, n in enumerate(all_lengths) if n > 0][: plan.max_samples]
    lengths = [all_lengths[i] for i in picked]
    if not lengths:
        raise RayFTError(f"{source}: no training example fits data.cutoff_len={plan.settings.cutoff_len} "
                         f"({dict(statuses)})")
    last = picked[-1]
    from ray.data.expressions import col

    selected = built.limit(last + 1).filter(expr=col("num_tokens") > 0).materialize()
    _write_records(selected, sft_file)
    rows_ds = selected.select_columns(TRAIN_SCHEMA.names)
    row_lengths = lengths
    if plan.packing:
        rows_ds = pack_windows(rows_ds, plan.packing_len or plan.settings.cutoff_len)
        row_lengths = pa.concat_tables(ray.get(rows_ds.select_columns(["num_tokens"]).to_arrow_refs())
                                       ).column("num_tokens").to_pylist()
    if len(row_lengths) < plan.num_shards:
        raise RayFTError(f"{source}: {len(row_lengths)} training rows cannot fill {plan.num_shards} shards "
                         "(data.num_shards, or one per training worker)")
    rows_ds.repartition(plan.num_shards).write_parquet(str(out_dir))
    name_parts(out_dir)
    cutoff = plan.settings.cutoff_len
    return {
        "built_examples": len(all_lengths),
        "statuses": dict(sorted(statuses.items())),
        "train_examples": len(lengths),
        "train_rows": len(row_lengths),
        "packing": plan.packing,
        "shortened_context": statuses.get("shortened_context", 0),
        "dropped_over_cutoff_len": statuses.get("dropped_over_cutoff_len", 0),
        "dropped_answer_too_long": statuses.get("dropped_answer_too_long", 0),
        "train_tokens": int(sum(lengths)),
        "train_tokens_max": int(max(lengths)),
        "train_tokens_mean": round(sum(lengths) / len(lengths), 1),
        "token_length_histogram": length_histogram(lengths, cutoff),
        # Real tokens / slots when each row is padded to the longest row of a batch of 8.
        "fill_ratio_batch8": fill_ratio(row_lengths, 8),
        "num_shards": plan.num_shards,
    }


def pack_windows(ds, capacity: int):
    """Pack each window of PACK_WINDOW consecutive rows (the last may be shorter) on its own, one
    Ray task per window; windows are cut at global row positions, whatever the block sizes, so
    the rows match a single-process packing of the same order."""
    import ray

    refs = ds.to_arrow_refs()
    sizes = ray.get([_num_rows.remote(r) for r in refs])
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    packed = []
    for w in range(0, sum(sizes), PACK_WINDOW):
        pieces = [(ref, max(w, s) - s, min(w + PACK_WINDOW, s + n) - s)
                  for ref, s, n in zip(refs, starts, sizes) if s < w + PACK_WINDOW and s + n > w]
        packed.append(_pack_window.remote(capacity, [(a, b) for _, a, b in pieces], *[r for r, _, _ in pieces]))
    return ray.data.from_arrow_refs(packed).materialize()


def _remote(fn):
    import ray

    return ray.remote(num_cpus=1)(fn)


@_remote
def _num_rows(table: pa.Table) -> int:
    return table.num_rows


@_remote
def _pack_window(capacity: int, spans: list[tuple[int, int]], *tables: pa.Table) -> pa.Table:
    window = pa.concat_tables([t.slice(a, b - a) for t, (a, b) in zip(tables, spans)])
    return pack_table(window, capacity)


def _write_records(selected, path: Path) -> None:
    """The selected examples as Alpaca/messages JSONL, in training order."""
    with path.open("w", encoding="utf-8") as f:
        for batch in selected.select_columns(["record"]).iter_batches(batch_format="pyarrow", batch_size=1024):
            for rec in batch.column("record").to_pylist():
                f.write(rec + "\n")


def length_histogram(lengths: list[int], cutoff: int, bins: int = 8) -> dict[str, int]:
    """{"lo-hi": count} over `bins` equal-width token-length bins up to cutoff."""
    width = max(1, -(-cutoff // bins))
    out: dict[str, int] = {}
    for b in range(bins):
        lo, hi = b * width + 1, min((b + 1) * width, cutoff)
        out[f"{lo}-{hi}"] = sum(1 for n in lengths if lo <= n <= hi)
    return out


def fill_ratio(lengths: list[int], batch_size: int) -> float:
    """Real tokens / padded slots for consecutive batches padded to their longest row."""
    slots = sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size])
                for i in range(0, len(lengths), batch_size))
    return round(sum(lengths) / slots, 4) if slots else 0.0


def dumps_manifest(manifest: dict) -> str:
    return json.dumps(manifest, indent=2, ensure_ascii=False)
