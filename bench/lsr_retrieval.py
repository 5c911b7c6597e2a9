"""What LM-supervised retrieval buys, side by side on the same held-out questions of a finished
embedding job with `embed.lsr` (`ray-ft train jobs/financial_lsr.yaml`): the base embedder, the
contrastive one (`embed/model`) and the LSR one (`embed/lsr/model`), each searching the test
split's passages; then what the LM said about the training candidates (`lsr_scores.parquet`).
Hit@k: the question's own passage is among the top k; 95% intervals by bootstrap over questions;
the MRR change is paired (same questions) against the contrastive embedder.

    .venv/bin/python bench/lsr_retrieval.py jobs/financial_lsr.yaml
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ray_ft.config import load_job
from ray_ft.data.embed_data import load_embedding_data
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.eval.intervals import bootstrap_ci, paired_difference_ci
from ray_ft.metrics.reranking import candidate_groups, dense_search, first_stage_orders, gold_rank
from ray_ft.models import resolve_model


def per_question(groups) -> dict[str, np.ndarray]:
    ranks = [gold_rank(g, o) for g, o in zip(groups, first_stage_orders(groups))]
    return {"hit@1": np.array([r is not None and r < 1 for r in ranks], float),
            "hit@5": np.array([r is not None and r < 5 for r in ranks], float),
            "MRR@10": np.array([1 / (r + 1) if r is not None and r < 10 else 0.0 for r in ranks])}


def cell(values: np.ndarray) -> str:
    lo, hi = bootstrap_ci(values)
    return f"{100 * values.mean():.1f} [{100 * lo:.1f}, {100 * hi:.1f}]"


def lm_view(path: Path) -> str:
    """How often the LM's favourite candidate is the question's own passage, and how much of its
    distribution sits there, over the training questions whose passage was retrieved."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    by_q: dict[int, list[dict]] = {}
    for r in rows:
        by_q.setdefault(r["question_id"], []).append(r)
    with_gold = [rs for rs in by_q.values() if any(r["is_gold"] for r in rs)]
    top = [max(rs, key=lambda r: r["lm_score"])["is_gold"] for rs in with_gold]
    first = [min(rs, key=lambda r: r["rank"])["is_gold"] for rs in with_gold]
    mass = [sum(r["lm_target"] for r in rs if r["is_gold"]) for rs in with_gold]
    return (f"{len(by_q)} training questions scored, own passage among the candidates for {len(with_gold)}; "
            f"of those the LM's top candidate is it for {100 * np.mean(top):.1f}% (the retriever's top: "
            f"{100 * np.mean(first):.1f}%), mean LM target mass on it {np.mean(mass):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job")
    args = ap.parse_args()
    cfg = load_job(args.job)
    data = load_embedding_data(cfg, cfg.run_dir / "embed" / "data")
    lsr_dir = cfg.run_dir / "embed" / "lsr"
    if data is None or not (lsr_dir / "model").is_dir():
        raise SystemExit(f"no finished LSR run under {cfg.run_dir}/embed: run `ray-ft train {args.job}` first")
    questions, contexts = [p.question for p in data.test], [p.context for p in data.test]
    instr = cfg.embed.query_instruction
    embedders = [("base", resolve_model(cfg.embed.model), ""), ("contrastive", cfg.run_dir / "embed" / "model", instr),
                 ("LSR", lsr_dir / "model", instr)]
    print(f"{len(questions)} test questions over {len(set(contexts))} passages (none trained on)\n")
    print("| embedder | hit@1 | hit@5 | MRR@10 | MRR@10 vs contrastive (paired) |\n|---|---:|---:|---:|---:|")
    scores = {}
    for name, folder, prefix in embedders:
        if not Path(folder).is_dir():
            continue
        search = dense_search(SentenceTransformerEmbedder(str(folder)).embed, prefix)
        m = scores[name] = per_question(candidate_groups(search, questions, contexts, 10))
        change = ""
        if name != "contrastive" and "contrastive" in scores:
            d, lo, hi = paired_difference_ci(m["MRR@10"], scores["contrastive"]["MRR@10"])
            change = f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        print(f"| {name} | {cell(m['hit@1'])} | {cell(m['hit@5'])} | {cell(m['MRR@10'])} | {change} |")
    print("\n" + lm_view(lsr_dir / "lsr_scores.parquet"))


if __name__ == "__main__":
    main()
