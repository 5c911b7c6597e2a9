"""The stages that train retrieval models: the embedder (contrastive, then optionally
LM-supervised) and the cross-encoder reranker, each with its retrieval evaluation on the
embedding data's test split. Outputs land under `output_dir/name/embed/` and `.../rerank/`.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.io import write_jsonl_atomic, write_text_atomic
from ray_ft.models import resolve_model
from ray_ft.pipeline import init_ray

log = logging.getLogger(__name__)


def stage_embed_data(cfg: JobConfig):
    """Triplets (random or mined negatives) and the test/val splits under embed/data, reused when
    the embedding data config and the source are unchanged."""
    from ray_ft.data.embed_data import load_embedding_data, prepare_embedding_data

    out = cfg.run_dir / "embed" / "data"
    data = load_embedding_data(cfg, out)
    if data is not None:
        log.info("reusing %s (same embedding data config and input)", out)
        return data
    if cfg.embed.hard_negatives.enabled:
        init_ray(cfg)  # mining runs on Ray Data
    return prepare_embedding_data(cfg, out)


def stage_embed(cfg: JobConfig, resume: bool = True) -> dict:
    """Embedding data -> retrieval eval of the base -> contrastive training on Ray Train (unless
    embed.lsr starts from the base) -> with embed.lsr, LM-supervised training from that result ->
    retrieval eval of each trained embedder. Writes embed/{data,model,lsr,metrics.jsonl,retrieval.*};
    `after` is the embedder the job serves (`JobConfig.finetuned_embedder_dir`)."""
    from ray_ft.embedder import SentenceTransformerEmbedder
    from ray_ft.metrics.retriever import columns_markdown, evaluate_retriever
    from ray_ft.train.embed import run_embed_training

    e = cfg.embed
    data = stage_embed_data(cfg)
    triplets, test, held = data.triplets, data.test, data.val
    base = resolve_model(e.model)
    val = {"questions": [p.question for p in held], "contexts": [p.context for p in held]} if held else None
    out = cfg.run_dir / "embed"
    questions, contexts = [p.question for p in test], [p.context for p in test]

    def evaluate(model_dir: Path, prefix: str) -> dict:
        emb = SentenceTransformerEmbedder(str(model_dir))
        return evaluate_retriever(emb.embed, questions, contexts, e.eval_top_k, e.sentence_splitter,
                                  e.recall_threshold, query_prefix=prefix)

    # The base model is scored as it is meant to be used (no instruction) and, to separate the
    # prompt's effect from training's, also with the instruction; the fine-tuned one with it.
    before = evaluate(base, "")
    before_instr = evaluate(base, e.query_instruction) if e.query_instruction else before
    columns = {"base": before, "base + instruction": before_instr}
    init_ray(cfg)
    m = data.manifest
    summary = {"skipped_rows": m["skipped_rows"], "train_pairs": m["train_pairs"], "test_pairs": len(test),
               "val_pairs": len(held), "triplets": len(triplets), "negatives": m["negatives"],
               "before": before, "before_with_instruction": before_instr}
    start = base
    if not (e.lsr.enabled and e.lsr.start_from == "base"):
        t = time.perf_counter()
        result = run_embed_training(cfg, triplets, base, out, val, resume=resume)
        train_s = time.perf_counter() - t
        columns["contrastive"] = after = evaluate(result.model_dir, e.query_instruction)
        summary.update({"steps": len(result.history), "exported_step": result.best_step, "train_s": train_s,
                        "first_loss": result.history[0]["loss"], "final_loss": result.history[-1]["loss"],
                        "after": after, "model_dir": str(result.model_dir)})
        start = result.model_dir
    if e.lsr.enabled:
        lsr = stage_lsr(cfg, data, start, val, resume)
        columns["LSR"] = after = evaluate(Path(lsr["model_dir"]), e.query_instruction)
        summary.setdefault("after_contrastive", summary.get("after"))
        summary.update({"lsr": lsr, "after": after, "model_dir": lsr["model_dir"],
                        **{k: lsr[k] for k in ("first_loss", "final_loss", "steps", "train_s")
                           if k not in summary}})
    summary["columns"] = columns
    write_text_atomic(out / "retrieval.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "retrieval.md", columns_markdown(columns))
    return summary


def stage_lsr(cfg: JobConfig, data, start: Path, val: dict | None, resume: bool = True) -> dict:
    """LM-supervised retrieval from the embedder in `start`: the training questions' candidates,
    the generator's scores of their answers (reused when questions, candidates and LM are
    unchanged), training on Ray Train. Writes embed/lsr/{lsr_scores.parquet,model,...}."""
    from ray_ft.data.lsr import (
        lsr_questions, lsr_rows, read_scores, retrieve_candidates, score_groups, scores_key, training_table,
        write_parquet_atomic,
    )
    from ray_ft.serve.prompting import rag_prompt_of
    from ray_ft.train.lsr import run_lsr_training

    e, lcfg = cfg.embed, cfg.embed.lsr
    out = cfg.run_dir / "embed" / "lsr"
    init_ray(cfg)
    questions = lsr_questions(data.triplets, lcfg.max_queries, e.seed)
    pool = [t["pos"][0] for t in data.triplets]  # every training passage
    groups = retrieve_candidates(questions, pool, str(start), e.query_instruction, lcfg.candidates,
                                 cfg.data.num_workers)
    lm, prompt = str(resolve_model(lcfg.lm or cfg.model.name)), rag_prompt_of(cfg)
    key = scores_key(groups, lm, prompt, lcfg.lm_max_len, lcfg.lm_dtype)
    t = time.perf_counter()
    scored = read_scores(out / "lsr_scores.parquet", groups, key)
    if scored is None:
        scored = score_groups(groups, lm, prompt, lcfg.lm_max_len, lcfg.lm_batch_size, lcfg.lm_workers,
                              lcfg.lm_cpus, lcfg.lm_use_gpu, lcfg.lm_dtype)
        write_parquet_atomic(lsr_rows(scored, lcfg.lm_score, lcfg.lm_temperature), out / "lsr_scores.parquet",
                             {"key": key})
    else:
        log.info("reusing %s (same questions, candidates and LM)", out / "lsr_scores.parquet")
    score_s = time.perf_counter() - t
    t = time.perf_counter()
    result = run_lsr_training(cfg, training_table(scored, lcfg.lm_score), Path(start), out, val, resume)
    gold = [g.gold_index for g in scored]
    lm_best = [max(enumerate(g.lm_scores(lcfg.lm_score)), key=lambda js: js[1])[0] for g in scored]
    return {"questions": len(scored), "candidates": lcfg.candidates, "lm": lm, "start": str(start),
            "gold_retrieved": sum(i >= 0 for i in gold) / len(gold),
            "gold_at_1": sum(i == 0 for i in gold) / len(gold),
            "lm_prefers_gold": sum(b == i for b, i in zip(lm_best, gold)) / len(gold),
            "score_s": score_s, "train_s": time.perf_counter() - t, "steps": len(result.history),
            "exported_step": result.best_step, "first_loss": result.history[0]["loss"],
            "final_loss": result.history[-1]["loss"], "model_dir": str(result.model_dir)}


def first_stage_search(cfg: JobConfig):
    """The served retriever's ranking (serve.retrieval for data.language: dense, BM25 or hybrid,
    by LanceDB as served) as a `Search` over a list of passages, for the rerank stage's candidates."""
    from ray_ft.embedder import SentenceTransformerEmbedder
    from ray_ft.kb.search import table_search

    r = cfg.serve.retrieval_for(cfg.data.language)
    embed = None if r.mode == "bm25" else SentenceTransformerEmbedder(str(resolve_model(cfg.serve.embedder))).embed
    return table_search(r, embed, cfg.serve.knowledge_base, cfg.data.language), r.mode


def stage_rerank(cfg: JobConfig, resume: bool = True) -> dict:
    """Embedding data -> first-stage candidates (the served retriever, top `rerank.candidates`)
    -> cross-encoder training on Ray Train -> the test questions' candidates in the first stage's
    order and reranked. Writes rerank/{model,candidates,metrics.jsonl,retrieval.*}."""
    from ray_ft.metrics.reranking import (
        candidate_groups, first_stage_orders, rank_metrics, reranked_orders, to_markdown,
    )
    from ray_ft.reranker import CrossEncoderReranker
    from ray_ft.train.rerank import run_rerank_training

    r = cfg.rerank
    data = stage_embed_data(cfg)
    search, mode = first_stage_search(cfg)
    val, test = ([candidate_groups(search, [p.question for p in pairs], [p.context for p in pairs], r.candidates)
                  for pairs in (data.val[:r.val_max_queries], data.test)])
    del search  # the first stage's weights, before the trainer starts
    out = cfg.run_dir / "rerank"
    for name, groups in (("val", val), ("test", test)):  # what the first stage fetched, for a user to read
        write_jsonl_atomic(out / "candidates" / f"{name}.jsonl", [g.to_dict() for g in groups])
    init_ray(cfg)
    t = time.perf_counter()
    result = run_rerank_training(cfg, data.triplets, resolve_model(r.model), out, val, resume)
    train_s = time.perf_counter() - t
    reranker = CrossEncoderReranker(str(result.model_dir), max_len=r.max_len)
    rows = {mode: rank_metrics(test, first_stage_orders(test)),
            f"{mode} + rerank": rank_metrics(test, reranked_orders(test, reranker.scores))}
    summary = {"triplets": len(data.triplets), "val_queries": len(val), "test_queries": len(test),
               "candidates": r.candidates, "first_stage": mode, "embedder": cfg.serve.embedder, "steps": len(result.history),
               "exported_step": result.best_step, "train_s": train_s,
               "first_loss": result.history[0]["loss"], "final_loss": result.history[-1]["loss"],
               "test": rows, "model_dir": str(result.model_dir)}
    write_text_atomic(out / "retrieval.json", json.dumps(summary, indent=2))
    write_text_atomic(out / "retrieval.md", to_markdown(rows))
    return summary
