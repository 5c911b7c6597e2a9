"""The whole loop of one job, stage by stage: prepare -> train -> serve -> evaluate.

Each stage is a function of the config and the previous stage's outputs, so the CLI can run one
stage alone or all of them in order. Outputs land under `output_dir/name/`:
data/ (shards, eval set, knowledge base, manifest), train/ (adapter, metrics), eval/ (report).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.data.prepare import (
    PreparedData, load_eval_records, load_knowledge_base, prepare, reusable,
)
from ray_ft.data.squad import read_qa_source
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl
from ray_ft.models import resolve_model

log = logging.getLogger(__name__)


def init_ray(cfg: JobConfig) -> None:
    """Join the configured cluster, or start a local one.

    A local cluster gets at least 4 logical CPUs even on a 2-core machine: logical CPUs are
    scheduling tokens, and Ray Data's read tasks must still be schedulable while the training
    worker holds its `cpus_per_worker`. The compute threads are set explicitly by each stage.
    """
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address:
        ray.init(address=cfg.ray.address)
        return
    num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=cfg.ray.include_dashboard)


def stage_prepare(cfg: JobConfig) -> PreparedData:
    """Validate the input and resolve the model first (fails fast), then run Ray Data."""
    records = read_qa_source(cfg.data.source)
    model_dir = resolve_model(cfg.model.name)
    init_ray(cfg)
    return prepare(cfg, cfg.run_dir / "data", records=records, model_dir=model_dir)


def stage_train(cfg: JobConfig, prepared: PreparedData):
    from ray_ft.train.sft import run_training

    return run_training(cfg, prepared, resolve_model(cfg.model.name), cfg.run_dir / "train")


def stage_serve(cfg: JobConfig, prepared: PreparedData, adapter_dir: Path | None) -> str:
    from ray_ft.serve.app import deploy

    init_ray(cfg)
    adapters = {cfg.name: str(adapter_dir.resolve())} if adapter_dir else {}
    adapters.update({label: str(Path(path).resolve()) for label, path in cfg.eval.adapters.items()})
    return deploy(cfg, str(resolve_model(cfg.model.name)), str(resolve_model(cfg.serve.embedder)),
                  adapters, load_knowledge_base(prepared))


def stage_eval(cfg: JobConfig, prepared: PreparedData, url: str,
               loss_history: list[dict] | None = None) -> list[dict]:
    from ray_ft.eval.clients import OpenAIChat, RAGClient
    from ray_ft.eval.runner import EvalTarget, PromptSettings, run_eval

    client = RAGClient(url)
    served = {"base": cfg.model.name, "finetuned": cfg.name}
    targets = [EvalTarget(label, served[label]) for label in cfg.eval.models]
    targets += [EvalTarget(label, label) for label in cfg.eval.adapters]
    targets += [EvalTarget(e.label, e.model, OpenAIChat(e.base_url, e.model, e.api_key_env))
                for e in cfg.eval.endpoints]
    judge = None
    if cfg.eval.judge.enabled:
        t = next(t for t in targets if t.label == cfg.eval.judge.model)
        judge = t.external or client.chat_model(t.served_name)
    items = load_eval_records(prepared, cfg.eval.max_samples)
    if len(items) < cfg.eval.max_samples:
        log.warning("only %d held-out questions (eval.max_samples=%d)", len(items), cfg.eval.max_samples)
    prompt = PromptSettings(cfg.data.language, cfg.model.system_prompt, cfg.serve.max_tokens)
    return run_eval(client, items, targets, cfg.eval, prompt, cfg.run_dir / "eval", judge, loss_history)


def trained_adapter(cfg: JobConfig) -> Path | None:
    """The adapter `ray-ft eval` serves as "finetuned": eval.adapter, else the run's own."""
    if "finetuned" not in cfg.eval.models:
        return None
    adapter = Path(cfg.eval.adapter) if cfg.eval.adapter else cfg.run_dir / "train" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise RayFTError(f"{adapter}: no LoRA adapter here (adapter_config.json missing); "
                         "run `ray-ft train JOB.yaml` first or set eval.adapter")
    return adapter


def check_servable(cfg: JobConfig) -> None:
    """The RAG graph serves the fine-tuned model as a LoRA adapter on the base engine."""
    if cfg.train.finetuning_type != "lora" and "finetuned" in cfg.eval.models:
        raise RayFTError(
            f"train.finetuning_type={cfg.train.finetuning_type}: serving a whole fine-tuned model "
            "beside the base is not supported yet; use `ray-ft train`, or set eval.models: [base]")


def check_extra_adapters(cfg: JobConfig) -> None:
    for label, path in cfg.eval.adapters.items():
        if not (Path(path) / "adapter_config.json").is_file():
            raise RayFTError(f"eval.adapters.{label}: {path}: no LoRA adapter here (adapter_config.json missing)")


def run_eval_only(cfg: JobConfig) -> list[dict]:
    """Serve base + an existing adapter and evaluate; reuse the prepared data when unchanged."""
    from ray import serve

    check_servable(cfg)
    adapter = trained_adapter(cfg)  # fail before starting anything
    check_extra_adapters(cfg)
    prepared = PreparedData(cfg.run_dir / "data")
    if reusable(prepared, cfg):
        log.info("reusing %s (same data config and input)", prepared.root)
    else:
        prepared = stage_prepare(cfg)
    metrics = cfg.run_dir / "train" / "metrics.jsonl"
    history = read_jsonl(metrics) if adapter and not cfg.eval.adapter and metrics.is_file() else None
    url = stage_serve(cfg, prepared, adapter)
    try:
        return stage_eval(cfg, prepared, url, history)
    finally:
        serve.shutdown()


def stage_embed(cfg: JobConfig) -> dict:
    """Triplets from the QA CSV -> retrieval eval of the base -> contrastive training on Ray
    Train -> retrieval eval of the result. Writes embed/{data,model,metrics.jsonl,retrieval.*}."""
    from ray_ft.data.split import seeded_sample
    from ray_ft.data.triplets import (
        build_triplets, pairs_of_triplets, read_qa_csv, read_triplets_jsonl, split_pairs,
    )
    from ray_ft.eval.retrieval_eval import evaluate_retriever, to_markdown
    from ray_ft.io import write_jsonl_atomic, write_text_atomic
    from ray_ft.serve.engines import SentenceTransformerEmbedder
    from ray_ft.train.embed import run_embed_training

    e = cfg.embed
    given = None  # triplets read from a FlagEmbedding JSONL source (its negatives kept as they are)
    if e.source.endswith(".jsonl"):
        given, skipped = read_triplets_jsonl(Path(e.source), e.on_error)
        pairs = pairs_of_triplets(given)
    else:
        pairs, skipped = read_qa_csv(Path(e.source), e.on_error)
    base = resolve_model(e.model)
    train, test = split_pairs(pairs, e.test_size, e.seed)
    train, held = split_pairs(train, e.val_size, e.seed + 1) if e.val_size else (train, [])
    held = seeded_sample(held, lambda p: f"{p.line}", e.val_max_queries, e.seed)
    val = {"questions": [p.question for p in held], "contexts": [p.context for p in held]} if held else None
    if given is None:
        triplets = build_triplets(train, e.neg_num, e.seed, e.query_instruction)
    else:
        keep = {p.line for p in train}
        triplets = [{k: v for k, v in t.items() if k != "line"} for t in given if t["line"] in keep]
    # Seeded shuffle (build_triplets returns them sorted by question): the trainer reads them in
    # this order, and a max_steps run must see a random slice, not the alphabetical first part.
    triplets = seeded_sample(triplets, lambda t: t["query"] + "\0" + t["pos"][0], e.max_train_samples, e.seed)
    out = cfg.run_dir / "embed"
    write_jsonl_atomic(out / "data" / "train.jsonl", triplets)
    write_jsonl_atomic(out / "data" / "test.jsonl",
                       [{"query": p.question, "pos": [p.context], "line": p.line} for p in test])
    questions, contexts = [p.question for p in test], [p.context for p in test]

    def evaluate(model_dir: Path, prefix: str) -> dict:
        emb = SentenceTransformerEmbedder(str(model_dir))
        return evaluate_retriever(emb.embed, questions, contexts, e.eval_top_k, e.sentence_splitter,
                                  e.recall_threshold, query_prefix=prefix)

    # The base model is scored as it is meant to be used (no instruction) and, to separate the
    # prompt's effect from training's, also with the instruction; the fine-tuned one with it.
    before = evaluate(base, "")
    before_instr = evaluate(base, e.query_instruction) if e.query_instruction else before
    init_ray(cfg)
    t = time.perf_counter()
    result = run_embed_training(cfg, triplets, base, out, val)
    train_s = time.perf_counter() - t
    after = evaluate(result.model_dir, e.query_instruction)
    summary = {"skipped_rows": skipped, "train_pairs": len(train), "test_pairs": len(test),
               "val_pairs": len(held), "triplets": len(triplets), "steps": len(result.history),
               "exported_step": result.best_step, "train_s": train_s,
               "first_loss": result.history[0]["loss"], "final_loss": result.history[-1]["loss"],
               "before": before, "before_with_instruction": before_instr, "after": after,
               "model_dir": str(result.model_dir)}
    write_text_atomic(out / "retrieval.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "retrieval.md", to_markdown(before, after))
    return summary


def run_all(cfg: JobConfig, force: set[str] | frozenset[str] = frozenset()) -> dict:
    """Run every stage in order; return the timings, the skipped stages and the eval table.

    Stages whose config (and upstream stages) are unchanged since they last finished are skipped
    (`ray_ft.stages`); `force` names stages to rerun anyway (their downstream stages rerun too).
    """
    from ray import serve

    from ray_ft.stages import StageLog
    from ray_ft.train.sft import TrainResult

    check_servable(cfg)
    check_extra_adapters(cfg)
    log_ = StageLog(cfg.run_dir, cfg, force)
    timings: dict[str, float] = {}
    skipped: list[str] = []

    t = time.perf_counter()
    prepared = PreparedData(cfg.run_dir / "data")
    if log_.fresh("prepare") is not None and reusable(prepared, cfg):
        skipped.append("prepare")
    else:
        prepared = stage_prepare(cfg)
        log_.done("prepare", {}, [prepared.manifest_file])
    timings["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rec = log_.fresh("train")
    if rec is not None:
        skipped.append("train")
        trained = TrainResult(Path(rec["adapter_dir"]), Path(rec["metrics_file"]),
                              read_jsonl(Path(rec["metrics_file"])), rec["exported_step"])
    else:
        trained = stage_train(cfg, prepared)
        log_.done("train", {"adapter_dir": str(trained.adapter_dir), "metrics_file": str(trained.metrics_file),
                            "exported_step": trained.exported_step},
                  [trained.adapter_dir, trained.metrics_file])
    timings["train_s"] = time.perf_counter() - t

    summary_file = cfg.run_dir / "eval" / "summary.json"
    if log_.fresh("eval") is not None:
        skipped.append("eval")
        table = json.loads(summary_file.read_text())
    else:
        t = time.perf_counter()
        url = stage_serve(cfg, prepared, trained.adapter_dir)
        timings["serve_start_s"] = time.perf_counter() - t
        try:
            t = time.perf_counter()
            table = stage_eval(cfg, prepared, url, trained.history)
            timings["eval_s"] = time.perf_counter() - t
        finally:
            serve.shutdown()
        log_.done("eval", {}, [summary_file])
    summary = {"job": cfg.name, "timings": timings, "skipped": skipped, "first_loss": trained.first_loss,
               "final_loss": trained.final_loss, "exported_step": trained.exported_step,
               "manifest": prepared.manifest(), "eval": table}
    (cfg.run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
