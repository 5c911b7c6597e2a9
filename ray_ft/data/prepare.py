"""The prepare stage: a corpus -> tokenized SFT shards (parquet), dev/eval sets, knowledge base.

Reading and validation happen in the driver (so a bad record fails fast with its position);
retrieval augmentation, templating, tokenization, truncation, selection, packing and shard writing
run on Ray Data. Everything is written to a temp folder and renamed into place only when complete;
the manifest records the config hash and the sha256 of every file, so an unchanged config and
input reuse the folder (`reusable`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import ray_ft
from ray_ft.config import JobConfig
from ray_ft.data.evalset import read_eval_source, train_and_eval
from ray_ft.data.examples import ExampleBuilder, ExampleSettings, chat_row, qa_row, rows_table
from ray_ft.data.nodes import build_nodes, read_text_documents
from ray_ft.data.readers import SourceData, read_source
from ray_ft.data.records import EXPORTERS, QARecord
from ray_ft.data.shards import TRAIN_SCHEMA, ShardPlan, dumps_manifest, write_train_set
from ray_ft.data.sources import folder_fingerprint, source_fingerprint
from ray_ft.data.split import seeded_sample, split_by_group
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl, staged_dir, write_jsonl_atomic, write_text_atomic
from ray_ft.models import resolve_model
from ray_ft.paths import inside

log = logging.getLogger(__name__)

__all__ = ["TRAIN_SCHEMA", "PreparedData", "prepare", "reusable", "data_config_hash"]


@dataclass(frozen=True)
class PreparedData:
    """Where the prepare stage put its outputs."""

    root: Path

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    def packed(self) -> bool:
        """The training rows are packed (they carry restarting `position_ids`)."""
        import pyarrow.parquet as pq

        shard = next(iter(sorted(self.train_dir.glob("*.parquet"))), None)
        return shard is not None and "position_ids" in pq.read_schema(shard).names

    @property
    def sft_file(self) -> Path:
        """The training examples as built, as Alpaca/messages records (data.sft_format)."""
        return self.root / "sft_train.jsonl"

    @property
    def eval_file(self) -> Path:
        return self.root / "eval.jsonl"

    @property
    def train_questions_file(self) -> Path:
        """QA sources: the training questions (after the dev split), grouped by passage."""
        return self.root / "train_questions.jsonl"

    @property
    def test_file(self) -> Path:
        """Instruction data only: the held-out conversations (there is no QA eval set)."""
        return self.root / "test.jsonl"

    @property
    def val_file(self) -> Path:
        """Dev rows for validation during training (only with data.dev_size > 0)."""
        return self.root / "val.parquet"

    @property
    def knowledge_base_file(self) -> Path:
        return self.root / "knowledge_base.jsonl"

    def nodes_file(self, group: str) -> Path:
        return inside(self.root / "nodes", f"{group}.jsonl")

    @property
    def manifest_file(self) -> Path:
        return self.root / "manifest.json"

    def manifest(self) -> dict:
        return json.loads(self.manifest_file.read_text())


def data_config_hash(cfg: JobConfig) -> str:
    """Fingerprint of everything the prepared data depends on: the data and model config, the
    shard count, the source's (and knowledge-base files' and a separate eval set's) content and
    the retrieving embedder."""
    h = hashlib.sha256()
    h.update(json.dumps({"data": cfg.data.model_dump(), "model": cfg.model.model_dump(),
                         "num_shards": cfg.num_shards, "ray_ft": ray_ft.__version__}, sort_keys=True).encode())
    if cfg.data.documents:  # the generated pairs replace data.source
        from ray_ft.data.from_documents import generation_key

        h.update(generation_key(cfg).encode())
    for src in [*([] if cfg.data.documents else [cfg.data.source]), *cfg.data.kb_sources]:
        h.update(hashlib.sha256(source_fingerprint(src)).digest())
    if cfg.eval.source is not None:  # only when set: jobs without one keep their hash
        e = cfg.eval
        h.update(json.dumps({"eval_format": e.format, "leakage": e.leakage}, sort_keys=True).encode())
        h.update(hashlib.sha256(source_fingerprint(e.source)).digest())
    if cfg.data.retrieval_augment.enabled:
        h.update(folder_fingerprint(cfg.data.retrieval_augment.embedder))
    return h.hexdigest()[:16]


def heldout_contexts(cfg: JobConfig) -> set[str]:
    """The passages `prepare` evaluates on (eval.source's, or the same read and seeded split), so
    that an embedder fine-tuned in the same job never trains on what the eval retrieves from."""
    d = cfg.data
    eval_data = read_eval_source(cfg)
    if eval_data is not None:
        return {r.context.strip() for r in eval_data.qa}
    source = read_source(d.source, d.format, d.on_error, d.bad_answer)
    if not source.is_qa:
        return set()
    _, held = split_by_group(source.qa, lambda r: r.passage_id, d.eval_size, d.seed)
    return {r.context.strip() for r in held}


def heldout_split_fingerprint(cfg: JobConfig) -> str:
    """Everything `heldout_contexts` depends on."""
    d = cfg.data
    keys = {"format": d.format, "on_error": d.on_error, "bad_answer": d.bad_answer, "eval_size": d.eval_size,
            "seed": d.seed, "source": hashlib.sha256(source_fingerprint(d.source)).hexdigest()}
    if cfg.eval.source is not None:
        keys["eval_source"] = hashlib.sha256(source_fingerprint(cfg.eval.source)).hexdigest()
        keys["eval_format"] = cfg.eval.format
    return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


def file_hashes(root: Path) -> dict[str, str]:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != "manifest.json":
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def reusable(prepared: PreparedData, cfg: JobConfig) -> bool:
    """True when `prepared` holds a complete prepare of exactly this config and input, with
    every file as it was written."""
    try:
        m = prepared.manifest()
    except (OSError, ValueError):
        return False
    return m.get("config_hash") == data_config_hash(cfg) and m.get("files") == file_hashes(prepared.root)


def example_settings(cfg: JobConfig) -> ExampleSettings:
    d = cfg.data
    return ExampleSettings(cfg.model.system_prompt, d.language, d.prompt_template, d.cutoff_len,
                           d.truncation, d.sft_format, d.seed)


def prepare(cfg: JobConfig, out_root: Path, source: SourceData | None = None,
            model_dir: Path | None = None, eval_data: SourceData | None = None) -> PreparedData:
    """Build the training shards, dev/eval sets and knowledge base for `cfg` under `out_root`.

    `source`, `eval_data` (eval.source's records) and `model_dir` may be passed in when the
    caller validated them already (the CLI does, before it starts Ray, so that bad input fails in
    a second).
    """
    d = cfg.data
    generated = None
    if d.documents:
        from ray_ft.data.from_documents import generated_corpus

        generated = generated_corpus(cfg)
        source = generated.source
    source = source or read_source(d.source, d.format, d.on_error, d.bad_answer)
    eval_data = eval_data or read_eval_source(cfg)
    if d.retrieval_augment.enabled and not source.is_qa:
        raise RayFTError(f"{d.source}: data.retrieval_augment needs a QA source (squad or qa_rows); "
                         f"this one holds {source.format} records, with no passages to retrieve for")
    model_dir = str(model_dir or resolve_model(cfg.model.name))
    items = source.qa if source.is_qa else source.chats
    group_of = (lambda r: r.passage_id) if source.is_qa else (lambda c: c.group)
    train, test, leakage = train_and_eval(cfg, source, eval_data)
    dev = []
    if d.dev_size:
        train, dev = split_by_group(train, group_of, d.dev_size, d.seed + 1)
    kb_docs = read_text_documents(d.kb_sources) if d.kb_sources else []
    if generated is not None:
        kb_docs = generated.kb_docs + kb_docs
    source_name = "data/generated_qa.jsonl" if generated is not None else d.source

    with staged_dir(out_root) as tmp:
        rows, radit = _train_rows(cfg, source, train)
        plan = ShardPlan(example_settings(cfg), model_dir, d.max_samples, d.packing, cfg.num_shards, d.num_workers,
                         d.packing_len)
        if generated is not None:
            write_jsonl_atomic(tmp / "generated_qa.jsonl", generated.rows)
        stats = write_train_set(rows, plan, tmp / "train", tmp / "sft_train.jsonl", source_name)
        if dev:
            stats["dev_questions"] = _write_val(cfg, dev, source.is_qa, model_dir, tmp / "val.parquet")
        if source.is_qa:  # what `ray-ft pairs` asks the trained model (never a held-out question)
            write_jsonl_atomic(tmp / "train_questions.jsonl", eval_order(train, d.seed))
        if source.is_qa or eval_data is not None:
            stats.update(_write_eval_and_kb(cfg, test, kb_docs, tmp))
        else:
            write_jsonl_atomic(tmp / "test.jsonl", [EXPORTERS[d.sft_format](c) for c in test])
            stats["test_conversations"] = len(test)
        manifest = {
            "source": "data.documents" if generated is not None else d.source, "format": source.format, "config_hash": data_config_hash(cfg),
            "model": model_dir, "read": asdict(source.report), "records": len(items),
            "groups": len({group_of(r) for r in items}), "train_groups": len({group_of(r) for r in train}),
            "train_questions": len(train), "heldout_questions": len(test),
            **({"eval_set": _eval_set_entry(cfg, eval_data, leakage)} if eval_data is not None else {}),
            **({"qa_generation": generated.stats} if generated is not None else {}),
            **({"retrieval_augment": radit} if radit else {}), **stats,
        }
        manifest["files"] = file_hashes(tmp)
        write_text_atomic(tmp / "manifest.json", dumps_manifest(manifest))
    log.info("prepared %s: %d training rows from %d records", out_root, stats["train_rows"], len(items))
    return PreparedData(out_root)


def _eval_set_entry(cfg: JobConfig, eval_data: SourceData, leakage) -> dict:
    """The manifest's record of a separate eval set: where from, what its reader skipped or
    repaired, and what it shares with the training data."""
    return {"source": cfg.eval.source, "format": eval_data.format, "read": asdict(eval_data.report),
            "records": len(eval_data.qa), "leakage": leakage.to_dict() if leakage else None}


def _train_rows(cfg: JobConfig, source: SourceData, train: list) -> tuple[list[dict], dict | None]:
    if not source.is_qa:
        return [chat_row(c) for c in train], None
    ra = cfg.data.retrieval_augment
    if not ra.enabled:
        return [qa_row(r) for r in train], None
    from ray_ft.data.radit import augment_with_retrieval

    return augment_with_retrieval(train, ra, str(resolve_model(ra.embedder)), cfg.data.num_workers)


def _write_eval_and_kb(cfg: JobConfig, held: list[QARecord], kb_docs: list[dict], out: Path) -> dict:
    """eval.jsonl (held-out questions, grouped by passage), knowledge_base.jsonl (their passages
    + the plain-text documents) and one nodes/NAME.jsonl per node group."""
    write_jsonl_atomic(out / "eval.jsonl", eval_order(held, cfg.data.seed))
    passages = {r.passage_id: r.context for r in held}
    docs = [{"passage_id": pid, "text": text} for pid, text in sorted(passages.items())]
    at = {doc["passage_id"]: i for i, doc in enumerate(docs)}
    for doc in kb_docs:  # a document given twice (or equal to a held-out passage) is kept once
        if doc["passage_id"] not in at:
            at[doc["passage_id"]] = len(docs)
            docs.append(doc)
        elif "metadata" in doc and "metadata" not in docs[at[doc["passage_id"]]]:
            docs[at[doc["passage_id"]]] = doc  # a held-out node keeps its document, page, heading
    write_jsonl_atomic(out / "knowledge_base.jsonl", docs)
    nodes = {}
    for name, group in cfg.data.node_groups.items():
        group_nodes = build_nodes(docs, group)
        write_jsonl_atomic(inside(out / "nodes", f"{name}.jsonl"), group_nodes)
        nodes[name] = len(group_nodes)
    return {"heldout_passages": len(passages), "knowledge_base_documents": len(docs),
            "kb_source_documents": len(kb_docs), "nodes": nodes}


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


def _write_val(cfg: JobConfig, dev: list, is_qa: bool, model_dir: str, path: Path) -> int:
    """Tokenized dev rows (for validation loss) with their context and answers (for generated-answer
    metrics), in a seeded order; rows that do not fit cutoff_len are left out."""
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    builder = ExampleBuilder(AutoTokenizer.from_pretrained(model_dir), example_settings(cfg))
    ordered = seeded_sample(dev, lambda r: r.id, None, cfg.data.seed)
    built = [builder.build(qa_row(r) if is_qa else chat_row(r)) for r in ordered]
    table = rows_table([b for b in built if b["num_tokens"] > 0])
    table = table.select([*TRAIN_SCHEMA.names, "context", "answers"])
    pq.write_table(table, path)
    return table.num_rows


def load_eval_records(prepared: PreparedData, n: int | None) -> list[dict]:
    if not prepared.eval_file.is_file():
        raise RayFTError(f"{prepared.eval_file}: no QA eval set: data.source is instruction data "
                         "(alpaca/messages); evaluation needs a QA source (squad or qa_rows)")
    rows = read_jsonl(prepared.eval_file)
    return rows if n is None else rows[:n]


def load_knowledge_base(prepared: PreparedData) -> list[dict]:
    return read_jsonl(prepared.knowledge_base_file)
