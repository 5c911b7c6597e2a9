"""`ray-ft run`: every stage of one job in order (`ray_ft.pipeline` holds the stages), each
skipped when its config and inputs are unchanged since it last finished (`ray_ft.stages`)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.console import report_stage
from ray_ft.data.prepare import PreparedData, reusable
from ray_ft.io import read_jsonl, write_text_atomic
from ray_ft.pipeline import require_eval_set, stage_eval, stage_pairs, stage_prepare, stage_serve, stage_train
from ray_ft.retriever_stages import stage_embed, stage_rerank
from ray_ft.served import check_extra_models


# The eval stage's files an MLflow run gets as artifacts (those that exist).
EVAL_ARTIFACTS = ("summary.md", "summary.json", "report.html", "metrics.png", "loss.png")


@dataclass(frozen=True)
class RunSummary:
    """What `run_all` did: written to run_dir/run_summary.json (fields that are None left out).
    The retrieval stages' and the pairs stage's records are their own summary files, as read back."""

    job: str
    task: str
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage that ran
    skipped: list[str] = field(default_factory=list)  # stages reused: config and inputs unchanged
    embed: dict | None = None  # embed/retrieval.json: the embedder's retrieval before/after, its folder
    rerank: dict | None = None  # rerank/retrieval.json
    first_loss: float | None = None  # task sft: mean train loss of the first/last 8 steps
    final_loss: float | None = None
    exported_step: int | None = None  # the checkpoint exported (the best by metric_for_best, else last)
    manifest: dict | None = None  # data/manifest.json
    eval: list[dict] | None = None  # the eval table: one row per (model, mode)
    pairs: dict | None = None  # pairs/summary.json (train.preference.mining.enabled)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, indent=2, ensure_ascii=False)


def planned_stages(cfg: JobConfig) -> list[str]:
    """The stages `run_all` goes through for this job, in order (what the run view lists)."""
    stages = [s for s, wanted in (("embed", cfg.task == "embedding" or cfg.embed.enabled),
                                  ("rerank", cfg.trains_reranker)) if wanted]
    if cfg.task != "sft":
        return stages
    return stages + ["prepare", "train", "serve", "eval"] + (["pairs"] if cfg.train.preference.mining.enabled else [])


class _Timed:
    """Times the stages of one `run_all` call, notes the skipped ones, and tells the run view
    (`ray_ft.console`, when one is open) what runs."""

    def __init__(self):
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []

    def __call__(self, key: str, fn):
        stage = key.removesuffix("_s").removesuffix("_start")
        report_stage(stage, "running")
        t = time.perf_counter()
        state = "failed"
        try:
            out = fn()
            state = "done"
            return out
        finally:
            self.timings[key] = time.perf_counter() - t
            report_stage(stage, state, self.timings[key])

    def skip(self, *stages: str) -> None:
        self.skipped.append(stages[0])
        for stage in stages:
            report_stage(stage, "skipped")


def _model_stage(cfg: JobConfig, log_, run: _Timed, stage: str, fit) -> dict:
    """A stage that trains a retrieval model (`embed`, `rerank`) and writes `stage/retrieval.json`,
    unless its record is fresh (then that summary is read back)."""
    summary_file = cfg.run_dir / stage / "retrieval.json"
    if log_.fresh(stage) is not None:
        run.skip(stage)
        return json.loads(summary_file.read_text())
    summary = run(f"{stage}_s", lambda: fit(cfg, resume=stage not in log_.force))
    log_.done(stage, {"model_dir": summary["model_dir"]}, [Path(summary["model_dir"]), summary_file])
    return summary


def _prepare_stage(cfg: JobConfig, log_, run: _Timed) -> PreparedData:
    prepared = PreparedData(cfg.run_dir / "data")
    if log_.fresh("prepare") is not None and reusable(prepared, cfg):
        run.skip("prepare")
        return prepared
    prepared = run("prepare_s", lambda: stage_prepare(cfg, force=log_.must_run("prepare")))
    log_.done("prepare", {}, [prepared.manifest_file])
    return prepared


def _train_stage(cfg: JobConfig, log_, run: _Timed, prepared: PreparedData):
    from ray_ft.train.result import TrainResult

    rec = log_.fresh("train")
    if rec is not None:
        run.skip("train")
        return TrainResult(Path(rec["adapter_dir"]), Path(rec["metrics_file"]),
                           read_jsonl(Path(rec["metrics_file"])), rec["exported_step"])
    trained = run("train_s", lambda: stage_train(cfg, prepared, resume="train" not in log_.force))
    log_.done("train", {"adapter_dir": str(trained.adapter_dir), "metrics_file": str(trained.metrics_file),
                        "exported_step": trained.exported_step}, [trained.adapter_dir, trained.metrics_file])
    return trained


def _eval_stage(cfg: JobConfig, log_, run: _Timed, prepared: PreparedData, trained) -> list[dict]:
    """Deploy the graph (the new adapter, and the fine-tuned embedder with embed.enabled), evaluate."""
    from ray_ft.serve.app import stop_serving

    summary_file = cfg.run_dir / "eval" / "summary.json"
    if log_.fresh("eval") is not None:
        run.skip("eval", "serve")
        return json.loads(summary_file.read_text())
    url = run("serve_start_s", lambda: stage_serve(cfg, prepared, trained.adapter_dir))
    try:
        table = run("eval_s", lambda: stage_eval(cfg, prepared, url, trained.history, trained.adapter_dir))
    finally:
        stop_serving(cfg)
    log_.done("eval", {}, [summary_file])
    return table


def _pairs_stage(cfg: JobConfig, log_, run: _Timed, prepared: PreparedData, trained) -> dict:
    """Preference pairs from the trained model's answers to the training questions."""
    summary_file = cfg.run_dir / "pairs" / "summary.json"
    if log_.fresh("pairs") is not None:
        run.skip("pairs")
        return json.loads(summary_file.read_text())
    adapter = trained.adapter_dir if cfg.train.preference.mining.model == "finetuned" else None
    path, _ = run("pairs_s", lambda: stage_pairs(cfg, prepared, adapter))
    log_.done("pairs", {"pairs_file": str(path)}, [path, summary_file])
    return json.loads(summary_file.read_text())


def required_jobs(cfg: JobConfig, _chain: tuple[str, ...] = ()) -> list[JobConfig]:
    """The jobs `cfg.requires` names, each after the ones it requires itself, in order, each once."""
    from ray_ft.config import load_job
    from ray_ft.errors import RayFTError

    out: list[JobConfig] = []
    for req in cfg.requires:
        key = str(Path(req.job).resolve())
        if key in _chain:
            raise RayFTError(f"{req.job}: requires: the jobs require each other ({' -> '.join(_chain + (key,))})")
        job = load_job(req.job, req.overrides)
        for dep in [*required_jobs(job, _chain + (key,)), job]:
            if all(dep.run_dir != o.run_dir for o in out):
                out.append(dep)
    return out


def run_chain(cfg: JobConfig, force: set[str] | frozenset[str] = frozenset(), around=None) -> list[RunSummary]:
    """`ray-ft run`: the jobs `cfg` requires (`required_jobs`), then `cfg` itself, each through
    `run_all`; `force` applies to `cfg` only. `around(job)` (a context manager, e.g. the run
    view) wraps each job. Returns their summaries, `cfg`'s last."""
    import contextlib

    from ray_ft.locks import run_folder_lock

    summaries = []
    for job in [*required_jobs(cfg), cfg]:
        with run_folder_lock(job.run_dir), around(job) if around else contextlib.nullcontext():
            summaries.append(run_all(job, force if job is cfg else frozenset()))
    return summaries


def run_all(cfg: JobConfig, force: set[str] | frozenset[str] = frozenset()) -> RunSummary:
    """Run every stage of the job in order; return the timings, the skipped stages, the embedder's
    retrieval before/after (with an embed stage) and the eval table.

    task sft: [embed ->] [rerank ->] prepare -> train -> serve + evaluate [-> pairs]; task embedding: embed
    alone; task rerank: [embed ->] rerank.
    Stages whose config and inputs are unchanged since they last finished are skipped
    (`ray_ft.stages`); `force` names stages to rerun anyway (the stages reading them rerun too).
    """
    from ray_ft.locks import run_folder_lock

    with run_folder_lock(cfg.run_dir):  # re-entrant: the CLI holds it already
        return _run_locked(cfg, force)


def _run_locked(cfg: JobConfig, force) -> RunSummary:
    from ray_ft.stages import StageLog
    from ray_ft.tracking import MLflowRun

    if cfg.task == "sft":
        check_extra_models(cfg)
    log_ = StageLog(cfg.run_dir, cfg, force)
    tracker = MLflowRun.open(cfg)
    try:
        summary = _stages(cfg, log_, _Timed(), tracker)
    except BaseException:
        if tracker:
            tracker.end(failed=True)
        raise
    write_text_atomic(cfg.run_dir / "run_summary.json", summary.to_json())
    if tracker:
        tracker.log_artifact(cfg.run_dir / "run_summary.json")
        tracker.end()
    return summary


def _stages(cfg: JobConfig, log_, run: _Timed, tracker) -> RunSummary:
    models: dict = {}
    for stage, fit, wanted in (("embed", stage_embed, cfg.task == "embedding" or cfg.embed.enabled),
                               ("rerank", stage_rerank, cfg.trains_reranker)):
        if wanted:
            models[stage] = _model_stage(cfg, log_, run, stage, fit)
            if tracker:
                history = cfg.run_dir / stage / "metrics.jsonl"
                tracker.log_history(stage, read_jsonl(history) if history.is_file() else [], stage in log_.ran)
    sft: dict = {}
    if cfg.task == "sft":
        prepared = _prepare_stage(cfg, log_, run)
        require_eval_set(prepared)  # before hours of training, not after
        trained = _train_stage(cfg, log_, run, prepared)
        if tracker:
            tracker.log_history("train", trained.history, "train" in log_.ran)
            tracker.set_tags({"ray_ft.trained": str(trained.adapter_dir.resolve())})
        table = _eval_stage(cfg, log_, run, prepared, trained)
        if tracker:
            ev = cfg.run_dir / "eval"
            tracker.log_eval(table, [ev / n for n in EVAL_ARTIFACTS], "eval" in log_.ran)
        sft = {"first_loss": trained.first_loss, "final_loss": trained.final_loss,
               "exported_step": trained.exported_step, "manifest": prepared.manifest(), "eval": table}
        if cfg.train.preference.mining.enabled:
            sft["pairs"] = _pairs_stage(cfg, log_, run, prepared, trained)
    return RunSummary(cfg.name, cfg.task, run.timings, run.skipped, **models, **sft)
