"""The prepare stage: QA corpus -> tokenized SFT shards (parquet), eval set and knowledge base.

Reading and validation happen in the driver (so a bad record fails fast with its position);
tokenization, filtering, ordering and shard writing run on Ray Data. Every output is written to a
temp folder and renamed into place only when complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from ray_ft.config import JobConfig
from ray_ft.data.packing import PackBatch
from ray_ft.data.split import order_key, seeded_sample, split_by_group
from ray_ft.data.squad import QARecord, read_qa_source
from ray_ft.data.templates import build_prompt
from ray_ft.data.tokenize import tokenize_example
from ray_ft.io import read_jsonl, write_jsonl_atomic, write_text_atomic
from ray_ft.models import resolve_model

log = logging.getLogger(__name__)

TRAIN_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("passage_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("order", pa.string()),
])


@dataclass(frozen=True)
class PreparedData:
    """Where the prepare stage put its outputs."""

    root: Path

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def val_file(self) -> Path:
        """Dev rows for validation during training (only with data.dev_size > 0)."""
        return self.root / "val.parquet"

    @property
    def knowledge_base_file(self) -> Path:
        return self.root / "knowledge_base.jsonl"

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict:
        return json.loads(self.manifest_file.read_text())


def data_config_hash(cfg: JobConfig) -> str:
    """Fingerprint of everything the prepared data depends on: the data and model config and,
    for a local source, the file's bytes. Equal hash -> the prepared folder can be reused."""
    h = hashlib.sha256()
    h.update(json.dumps({"data": cfg.data.model_dump(), "model": cfg.model.model_dump()},
                        sort_keys=True).encode())
    src = Path(cfg.data.source)
    if "://" not in cfg.data.source and src.is_file():
        with src.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def reusable(prepared: PreparedData, cfg: JobConfig) -> bool:
    """True when `prepared` holds a complete prepare of exactly this config and input."""
    try:
        return prepared.manifest().get("config_hash") == data_config_hash(cfg)
    except (OSError, ValueError):
        return False


class TokenizeBatch:
    """Ray Data callable: one tokenizer per actor, a pyarrow table of training rows per batch."""

    def __init__(self, model_dir: str, system_prompt: str, language: str, seed: int):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.system_prompt, self.language, self.seed = system_prompt, language, seed

    def __call__(self, batch: dict) -> pa.Table:
        cols: dict[str, list] = {name: [] for name in TRAIN_SCHEMA.names}
        for qid, pid, ctx, q, answers in zip(
            batch["id"], batch["passage_id"], batch["context"], batch["question"], batch["answers"]
        ):
            user = build_prompt(ctx, q, self.language)
            ex = tokenize_example(self.tok, self.system_prompt, user, str(answers[0]))
            cols["id"].append(str(qid))
            cols["passage_id"].append(str(pid))
            cols["input_ids"].append(ex.input_ids)
            cols["labels"].append(ex.labels)
            cols["num_tokens"].append(len(ex.input_ids))
            cols["order"].append(order_key(self.seed, str(qid)))
        return pa.Table.from_pydict(cols, schema=TRAIN_SCHEMA)


def prepare(cfg: JobConfig, out_root: Path, records: list[QARecord] | None = None,
            model_dir: Path | None = None) -> PreparedData:
    """Build the SFT shards, eval set and knowledge base for `cfg` under `out_root`.

    `records` and `model_dir` may be passed in when the caller validated them already (the CLI
    does, before it starts Ray, so that bad input fails in a second).
    """
    import ray

    records = records if records is not None else read_qa_source(cfg.data.source)
    train_recs, held_recs = split_by_group(
        records, lambda r: r.passage_id, cfg.data.val_size, cfg.data.seed
    )
    dev_recs: list[QARecord] = []
    if cfg.data.dev_size:
        train_recs, dev_recs = split_by_group(
            train_recs, lambda r: r.passage_id, cfg.data.dev_size, cfg.data.seed + 1
        )
    model_dir = model_dir or resolve_model(cfg.model.name)

    out_root.parent.mkdir(parents=True, exist_ok=True)
    tmp_root = Path(tempfile.mkdtemp(dir=out_root.parent, prefix=f".{out_root.name}."))
    try:
        stats = _write_train_shards(cfg, train_recs, str(model_dir), tmp_root / "train", ray)
        if dev_recs:
            stats["dev_questions"] = _write_val(cfg, dev_recs, str(model_dir), tmp_root / "val.parquet")
        eval_rows = eval_order(held_recs, cfg.data.seed)
        write_jsonl_atomic(tmp_root / "eval.jsonl", eval_rows)
        kb = {r.passage_id: r.context for r in held_recs}
        write_jsonl_atomic(
            tmp_root / "knowledge_base.jsonl",
            [{"passage_id": pid, "text": text} for pid, text in sorted(kb.items())],
        )
        manifest = {
            "source": cfg.data.source,
            "config_hash": data_config_hash(cfg),
            "model": str(model_dir),
            "records": len(records),
            "passages": len({r.passage_id for r in records}),
            "train_questions": len(train_recs),
            "heldout_questions": len(held_recs),
            "heldout_passages": len(kb),
            **stats,
        }
        write_text_atomic(tmp_root / "manifest.json", json.dumps(manifest, indent=2))
        if out_root.exists():
            shutil.rmtree(out_root)
        tmp_root.rename(out_root)
    except BaseException:
        shutil.rmtree(tmp_root, ignore_errors=True)
        raise
    log.info("prepared %s", json.dumps(manifest))
    return PreparedData(out_root)


def eval_order(held_recs: list[QARecord], seed: int) -> list[dict]:
    """Held-out questions grouped by passage, passages in a seeded order.

    Taking the first N rows then means "all questions of the first passages": a sample that keeps
    each passage's questions together, which lets the engine's prefix cache share one prefill.
    """
    by_passage: dict[str, list[QARecord]] = {}
    for r in held_recs:
        by_passage.setdefault(r.passage_id, []).append(r)
    passages = seeded_sample(list(by_passage), lambda pid: pid, None, seed)
    return [r.to_row() for pid in passages for r in sorted(by_passage[pid], key=lambda r: r.id)]


def _write_train_shards(cfg: JobConfig, train_recs: list[QARecord], model_dir: str, out: Path, ray) -> dict:
    ds = ray.data.from_items([r.to_row() for r in train_recs])
    ds = ds.map_batches(
        TokenizeBatch,
        fn_constructor_kwargs=dict(
            model_dir=model_dir, system_prompt=cfg.model.system_prompt,
            language=cfg.data.language, seed=cfg.data.seed,
        ),
        batch_size=64,
        concurrency=1,
    ).materialize()
    cutoff = cfg.data.cutoff_len
    fitting = ds.filter(expr=f"num_tokens <= {cutoff}")
    n_tokenized, n_fitting = ds.count(), fitting.count()
    # A seeded, input-order-independent selection: sort by the per-id hash, keep max_samples.
    selected = fitting.sort("order")
    if cfg.data.max_samples is not None:
        selected = selected.limit(cfg.data.max_samples)
    selected = selected.materialize()
    n_selected = selected.count()
    if n_selected == 0:
        raise ValueError(f"{cfg.data.source}: no training example fits data.cutoff_len={cutoff}")
    lengths = selected.select_columns(["num_tokens"]).to_pandas()["num_tokens"]
    rows = selected
    if cfg.data.packing:
        # Pack windows of consecutive (seeded-order) examples; preserve_order keeps it reproducible.
        rows = selected.map_batches(PackBatch, fn_constructor_kwargs={"capacity": cutoff},
                                    batch_size=PACK_WINDOW, batch_format="pyarrow", concurrency=1).materialize()
    n_rows = rows.count()
    if n_rows < cfg.data.num_shards:
        raise ValueError(f"{cfg.data.source}: {n_rows} training rows cannot fill data.num_shards="
                         f"{cfg.data.num_shards} shards")
    rows.repartition(cfg.data.num_shards).write_parquet(str(out))
    row_lengths = rows.select_columns(["num_tokens"]).to_pandas()["num_tokens"]
    return {
        "train_examples": int(n_selected),
        "train_rows": int(n_rows),
        "packing": cfg.data.packing,
        "dropped_over_cutoff_len": int(n_tokenized - n_fitting),
        "train_tokens": int(lengths.sum()),
        "train_tokens_max": int(lengths.max()),
        "train_tokens_mean": round(float(lengths.mean()), 1),
        "token_length_histogram": length_histogram(lengths.tolist(), cutoff),
        # Real tokens / slots when each row is padded to the longest row of a batch of 8.
        "fill_ratio_batch8": fill_ratio(row_lengths.tolist(), 8),
        "num_shards": cfg.data.num_shards,
    }


PACK_WINDOW = 512  # examples packed together; larger windows pack tighter but hold more in memory


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


def _write_val(cfg: JobConfig, dev_recs: list[QARecord], model_dir: str, path: Path) -> int:
    """Tokenized dev rows (for validation loss) with their context and answers (for generated-answer
    metrics), in a seeded order, over-long ones dropped."""
    import pyarrow.parquet as pq

    rows = seeded_sample(dev_recs, lambda r: r.id, None, cfg.data.seed)
    batch = {k: [getattr(r, k) if k != "answers" else list(r.answers) for r in rows]
             for k in ("id", "passage_id", "context", "question", "answers")}
    table = TokenizeBatch(model_dir, cfg.model.system_prompt, cfg.data.language, cfg.data.seed)(batch)
    table = table.append_column("context", pa.array(batch["context"]))
    table = table.append_column("answers", pa.array(batch["answers"], type=pa.list_(pa.string())))
    keep = [i for i, n in enumerate(table.column("num_tokens").to_pylist()) if n <= cfg.data.cutoff_len]
    pq.write_table(table.take(keep), path)
    return len(keep)


def load_eval_records(prepared: PreparedData, n: int | None) -> list[dict]:
    rows = read_jsonl(prepared.eval_file)
    return rows if n is None else rows[:n]


def load_knowledge_base(prepared: PreparedData) -> list[dict]:
    return read_jsonl(prepared.knowledge_base_file)
