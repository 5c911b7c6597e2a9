"""The whole loop of one job, stage by stage: prepare -> train -> serve -> evaluate.

Each stage is a function of the config and the previous stage's outputs, so the CLI can run one
stage alone or all of them in order. Outputs land under `output_dir/name/`:
data/ (shards, eval set, knowledge base, manifest), train/ (adapter, metrics), eval/ (report).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.data.prepare import (
    PreparedData, load_eval_records, load_knowledge_base, prepare, reusable,
)
from ray_ft.data.evalset import read_eval_source
from ray_ft.data.readers import read_source
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl
from ray_ft.models import resolve_model
from ray_ft.served import (
    check_extra_models, served_descriptions, served_models, served_reranker, trained_model,
)

log = logging.getLogger(__name__)


def init_ray(cfg: JobConfig) -> None:
    """Join the configured cluster, or start a local one.

    A local cluster gets at least 4 logical CPUs even on a 2-core machine: logical CPUs are
    scheduling tokens, and Ray Data's read tasks must still be schedulable while the training
    worker holds its `cpus_per_worker`. The compute threads are set explicitly by each stage.
    """
    import ray

    from ray_ft import console

    if ray.is_initialized():
        return
    # Workers' output (training ranks, vLLM, Ray Data actors) stays in Ray's log files unless
    # --verbose; `ray-ft` copies them to run_dir/logs/ray.
    if cfg.ray.address:
        ray.init(address=cfg.ray.address, log_to_driver=console.verbose())
    else:
        num_cpus = cfg.ray.num_cpus or max(4, os.cpu_count() or 1)
        ray.init(num_cpus=num_cpus, include_dashboard=cfg.ray.include_dashboard, log_to_driver=console.verbose())
    console.quiet_libraries()


def stage_prepare(cfg: JobConfig, force: bool = False) -> PreparedData:
    """Reuse the prepared folder when its config, input and files are unchanged; else validate
    the input, the model and its chat template first (fails fast), then run Ray Data."""
    from transformers import AutoTokenizer

    from ray_ft.data.tokenize import check_chat_template

    prepared = PreparedData(cfg.run_dir / "data")
    if not force and reusable(prepared, cfg):
        log.info("reusing %s (same data config, input and files)", prepared.root)
        return prepared
    d = cfg.data
    if d.documents:  # listed now (a missing path fails in a second); read and written on Ray Data
        from ray_ft.data.documents import list_documents

        list_documents(d.documents)
        source = None
    else:
        source = read_source(d.source, d.format, d.on_error, d.bad_answer)
    eval_data = read_eval_source(cfg)
    model_dir = resolve_model(cfg.model.name)
    check_chat_template(AutoTokenizer.from_pretrained(model_dir))
    init_ray(cfg)
    return prepare(cfg, prepared.root, source=source, model_dir=model_dir, eval_data=eval_data)


def stage_train(cfg: JobConfig, prepared: PreparedData, resume: bool = True):
    """The `train.method` recipe (`ray_ft.recipes`); a stopped run of the same config and data
    continues from its latest checkpoint (`resume=False`: from step 0)."""
    from ray_ft.recipes import RECIPES

    if cfg.train.is_preference:  # a bad pairs file fails in a second, before Ray starts
        from ray_ft.data.preference import read_preference_source

        read_preference_source(cfg.train.preference.source, cfg.data.on_error)
    init_ray(cfg)  # reused data did not start it; Ray's auto-init would ignore cfg.ray
    run = RECIPES[cfg.train.method].load()
    return run(cfg, prepared, resolve_model(cfg.model.name), cfg.run_dir / "train", resume=resume)


def stage_serve(cfg: JobConfig, prepared: PreparedData, trained: str | Path | None) -> str:
    from ray_ft.serve.app import deploy

    init_ray(cfg)
    adapters, whole = served_models(cfg, trained)
    return deploy(cfg, str(resolve_model(cfg.model.name)), str(resolve_model(cfg.serve.embedder)),
                  adapters, load_knowledge_base(prepared), whole, take_over=False,
                  reranker_dir=served_reranker(cfg))


def stage_eval(cfg: JobConfig, prepared: PreparedData, url: str,
               loss_history: list[dict] | None = None, trained: str | Path | None = None) -> list[dict]:
    """Evaluate the served graph at `url`; `trained` is the fine-tuned folder it serves (for the
    report's note on how it was served)."""
    from ray_ft.eval.clients import OpenAIChat, RAGClient
    from ray_ft.eval.runner import EvalTarget, PromptSettings, run_eval
    from ray_ft.serve.adapters import has_adapter
    from ray_ft.serve.prompting import rag_prompt_of

    trained_kind = None if not trained else "adapter" if has_adapter(trained) else "model"

    client = RAGClient(url, api_key_env=cfg.serve.auth_token_env)
    served = {"base": cfg.model.name, "finetuned": cfg.name}
    targets = [EvalTarget(label, served[label]) for label in cfg.eval.models]
    targets += [EvalTarget(label, label) for label in [*cfg.eval.adapters, *cfg.serve.models]]
    targets += [EvalTarget(e.label, e.model, OpenAIChat(e.base_url, e.model, e.api_key_env))
                for e in cfg.eval.endpoints]
    judge = None
    if cfg.eval.judge.enabled:
        t = next(t for t in targets if t.label == cfg.eval.judge.model)
        judge = t.external or client.chat_model(t.served_name)
    items = load_eval_records(prepared, cfg.eval.max_samples)
    if len(items) < cfg.eval.max_samples:
        log.warning("only %d held-out questions (eval.max_samples=%d)", len(items), cfg.eval.max_samples)
    rag_prompt = rag_prompt_of(cfg)  # the ingress's prompt: external targets get the same chat
    prompt = PromptSettings(cfg.data.language, rag_prompt.system_prompt, cfg.serve.max_tokens, rag_prompt.template,
                            rag_prompt.training_template)
    return run_eval(client, items, targets, cfg.eval, prompt, cfg.run_dir / "eval", judge, loss_history,
                    served_as=served_descriptions(cfg, trained_kind), notes=eval_notes(cfg, items, prepared.manifest()))


def eval_notes(cfg: JobConfig, items: list[dict], manifest: dict) -> list[str]:
    """The report's lines on what was asked (where the eval set came from, what it shares with
    the training data) and how it was retrieved."""
    passages = len({it["passage_id"] for it in items})
    mode = cfg.serve.retrieval_for(cfg.data.language).mode
    evalset = manifest.get("eval_set")
    if evalset is None:
        origin = f"held out of data.source by passage (data.eval_size {cfg.data.eval_size}, seed {cfg.data.seed})"
    else:
        origin = f"eval.source {evalset['source']} ({evalset['read']['skipped_records']} bad records skipped)"
        leak = evalset.get("leakage")
        if leak:
            origin += (f"; shared with data.source (exact after whitespace normalisation): "
                       f"{leak['shared_passages']} passages, {leak['shared_questions']} questions, "
                       f"{leak['affected_questions']} eval questions affected, {leak['dropped_questions']} "
                       f"dropped (eval.leakage: {leak['policy']})")
    rerank = (f"; reranked mode: the top {cfg.serve.rerank.candidates} reordered by the cross-encoder "
              f"{cfg.served_reranker}" if cfg.serve.rerank.enabled else "")
    return [f"Eval set: {len(items)} questions over {passages} passages, {origin}. Retrieved context: "
            f"top {cfg.serve.top_k} by {mode} (serve.retrieval.mode: {cfg.serve.retrieval.mode}){rerank}; "
            f"answers greedy, at most {cfg.serve.max_tokens} tokens."]


def require_eval_set(prepared: PreparedData) -> None:
    if not prepared.eval_file.is_file():
        raise RayFTError(f"{prepared.root}: the data is instruction data (alpaca/messages) with no QA eval "
                         "set; `ray-ft run`/`eval` need a QA source (squad or qa_rows); use `ray-ft train`")


def run_eval_only(cfg: JobConfig) -> list[dict]:
    """Serve base + the trained (or an existing) model and evaluate; reuse the prepared data when
    unchanged."""
    from ray_ft.serve.app import stop_serving

    trained = trained_model(cfg)  # fail before starting anything
    check_extra_models(cfg)
    prepared = stage_prepare(cfg)
    require_eval_set(prepared)
    metrics = cfg.run_dir / "train" / "metrics.jsonl"
    history = read_jsonl(metrics) if trained and not cfg.eval.adapter and metrics.is_file() else None
    url = stage_serve(cfg, prepared, trained)
    try:
        return stage_eval(cfg, prepared, url, history, trained)
    finally:
        stop_serving(cfg)


def run_pairs(cfg: JobConfig):
    """`ray-ft pairs`: serve the trained adapter (or the base, `train.preference.mining.model`),
    have it answer the training questions, and write its low-scoring answers as preference pairs
    to run_dir/pairs/pairs.jsonl. Returns (that path, the MinedPairs)."""
    mining = cfg.train.preference.mining
    trained = trained_model(cfg) if mining.model == "finetuned" else None  # fail before starting anything
    if mining.model == "finetuned" and trained is None:
        raise RayFTError("train.preference.mining.model=finetuned, but eval.models leaves out finetuned")
    return stage_pairs(cfg, stage_prepare(cfg), trained)


def stage_pairs(cfg: JobConfig, prepared: PreparedData, trained: Path | None):
    """The pairs stage: the adapter in `trained` (None: the base model) answers the training
    questions with their own passages; answers below `mining.max_f1` become pairs in
    run_dir/pairs/pairs.jsonl. Returns (that path, the MinedPairs)."""
    from ray_ft.eval.clients import RAGClient
    from ray_ft.eval.pairs import mine_pairs, write_pairs
    from ray_ft.serve.app import stop_serving
    from ray_ft.serve.prompting import rag_prompt_of

    mining = cfg.train.preference.mining
    if not prepared.train_questions_file.is_file():
        raise RayFTError(f"{prepared.train_questions_file}: no training questions: pairs need a QA data.source "
                         "(squad or qa_rows); data prepared by an older ray_ft needs `ray-ft prepare --force`")
    items = read_jsonl(prepared.train_questions_file)[: mining.max_questions]
    served = cfg.name if trained else cfg.model.name
    url = stage_serve(cfg, prepared, trained)
    try:
        client = RAGClient(url, api_key_env=cfg.serve.auth_token_env)
        mined = mine_pairs(client, items, served, rag_prompt_of(cfg), mining, cfg.serve.max_tokens)
    finally:
        stop_serving(cfg)
    return write_pairs(mined, cfg.run_dir / "pairs", served, mining), mined
