"""What a trained reranker buys, side by side on the same held-out questions of a finished
rerank job (`ray-ft train JOB.yaml`, task: rerank): each first stage (dense, BM25, hybrid) over the
test split's passages, and each of them with its top-n reranked; then the reranker's speed,
pairs/s scored one pair per call vs in batches, in one process. Hit@k: the question's own
passage is among the top k; 95% intervals by bootstrap over questions.

    .venv/bin/python bench/rerank_retrieval.py jobs/financial_rerank.yaml [--questions 400]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ray_ft.config import load_job
from ray_ft.data.embed_data import load_embedding_data
from ray_ft.eval.intervals import bootstrap_ci, paired_difference_ci
from ray_ft.metrics.reranking import candidate_groups, first_stage_orders, gold_rank, reranked_orders
from ray_ft.retriever_stages import first_stage_search
from ray_ft.reranker import CrossEncoderReranker


def per_question(groups, orders) -> dict[str, np.ndarray]:
    ranks = [gold_rank(g, o) for g, o in zip(groups, orders)]
    return {"hit@1": np.array([r is not None and r < 1 for r in ranks], float),
            "hit@5": np.array([r is not None and r < 5 for r in ranks], float),
            "MRR@10": np.array([1 / (r + 1) if r is not None and r < 10 else 0.0 for r in ranks])}


def fused(reranked: list[int], k: int = 60) -> list[int]:
    """Candidates by 1/(k + first-stage rank) + 1/(k + reranker rank) (candidate i has first-stage rank i)."""
    by_rerank = {c: r for r, c in enumerate(reranked)}
    return sorted(by_rerank, key=lambda c: -(1 / (k + c + 1) + 1 / (k + by_rerank[c] + 1)))


def cell(values: np.ndarray) -> str:
    lo, hi = bootstrap_ci(values)
    return f"{100 * values.mean():.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    ap.add_argument("--questions", type=int, default=None, help="first n test questions (default: all)")
    ap.add_argument("--speed-pairs", type=int, default=256)
    args = ap.parse_args()
    cfg = load_job(args.job)
    data = load_embedding_data(cfg, cfg.run_dir / "embed" / "data")
    if data is None:
        raise SystemExit(f"no embedding data under {cfg.run_dir}/embed/data: run `ray-ft train {args.job}` first")
    test = data.test[: args.questions]
    questions, contexts = [p.question for p in test], [p.context for p in test]
    reranker = CrossEncoderReranker(cfg.finetuned_reranker_dir, max_len=cfg.rerank.max_len)
    n = cfg.rerank.candidates
    print(f"{len(test)} test questions over {len(set(contexts))} passages; top {n} reranked; "
          f"reranker {cfg.finetuned_reranker_dir}\n")
    print("| first stage | reranked | hit@1 | hit@5 | MRR@10 | MRR@10 change (paired) |\n|---|---|---:|---:|---:|---:|")
    for mode in ("dense", "bm25", "hybrid"):
        search, _ = first_stage_search(cfg.model_copy(update={"serve": cfg.serve.model_copy(update={
            "retrieval": cfg.serve.retrieval.model_copy(update={"mode": mode})})}))
        groups = candidate_groups(search, questions, contexts, n)
        first = per_question(groups, first_stage_orders(groups))
        reranked = reranked_orders(groups, reranker.scores)
        rows = [("no", first), ("yes", per_question(groups, reranked)),
                ("yes, fused with the first stage (RRF k=60)", per_question(groups, [fused(o) for o in reranked]))]
        for label, m in rows:
            d, lo, hi = paired_difference_ci(m["MRR@10"], first["MRR@10"])
            change = "" if m is first else f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
            print(f"| {mode} | {label} | {cell(m['hit@1'])} | {cell(m['hit@5'])} | {cell(m['MRR@10'])} | {change} |")

    pairs = [(q, c) for q, c in zip(questions, contexts)][: args.speed_pairs]
    qs, ps = [p[0] for p in pairs], [p[1] for p in pairs]
    reranker.logits(qs[:8], ps[:8])  # warm-up
    print(f"\nreranker speed, {len(pairs)} (question, passage) pairs, max_len {cfg.rerank.max_len}:")
    base = None
    for batch in (1, 8, 32):
        reranker.batch_size = batch
        t0 = time.perf_counter()
        reranker.logits(qs, ps)
        rate = len(pairs) / (time.perf_counter() - t0)
        base = base or rate
        print(f"  batch {batch:>2}: {rate:7.1f} pairs/s  ({rate / base:.2f}x batch 1)")


if __name__ == "__main__":
    main()
