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
from ray_ft.data.prepare import PreparedData, load_eval_records, load_knowledge_base, prepare
from ray_ft.data.squad import read_qa_source
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

    adapters = {cfg.name: str(adapter_dir.resolve())} if adapter_dir else {}
    return deploy(cfg, str(resolve_model(cfg.model.name)), str(resolve_model(cfg.serve.embedder)),
                  adapters, load_knowledge_base(prepared))


def stage_eval(cfg: JobConfig, prepared: PreparedData, url: str) -> list[dict]:
    from ray_ft.eval.runner import EvalTarget, RAGClient, run_eval

    served = {"base": cfg.model.name, "finetuned": cfg.name}
    targets = [EvalTarget(label, served[label]) for label in cfg.eval.models]
    items = load_eval_records(prepared, cfg.eval.max_samples)
    if len(items) < cfg.eval.max_samples:
        log.warning("only %d held-out questions (eval.max_samples=%d)", len(items), cfg.eval.max_samples)
    return run_eval(RAGClient(url), items, targets, cfg.eval.modes, cfg.eval.concurrency,
                    cfg.run_dir / "eval")


def run_all(cfg: JobConfig) -> dict:
    """Run every stage in order; return the timings and the eval table."""
    from ray import serve

    timings: dict[str, float] = {}
    t = time.perf_counter()
    prepared = stage_prepare(cfg)
    timings["prepare_s"] = time.perf_counter() - t

    t = time.perf_counter()
    trained = stage_train(cfg, prepared)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    url = stage_serve(cfg, prepared, trained.adapter_dir)
    timings["serve_start_s"] = time.perf_counter() - t
    try:
        t = time.perf_counter()
        table = stage_eval(cfg, prepared, url)
        timings["eval_s"] = time.perf_counter() - t
    finally:
        serve.shutdown()
    summary = {"job": cfg.name, "timings": timings, "first_loss": trained.first_loss,
               "final_loss": trained.final_loss, "manifest": prepared.manifest(), "eval": table}
    (cfg.run_dir / "run_summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))
    return summary
