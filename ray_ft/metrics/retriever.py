"""Retrieval evaluation of an embedder on held-out QA pairs (the seed recipe's protocol).

The knowledge base is the distinct contexts of the test split; each test question retrieves the
top-k by exact cosine. Reported: context recall and context relevance of the top-1 passage (the
seed's setting), recall@1/@5, MRR@k and nDCG@k over the top-k.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ray_ft.metrics.retrieval import context_recall, context_relevance, mrr_at_k, ndcg_at_k, recall_at_k

EmbedFn = Callable[[list[str]], np.ndarray]


def evaluate_retriever(embed: EmbedFn, questions: list[str], contexts: list[str], top_k: int,
                       splitter: str, recall_threshold: float = 0.5, query_prefix: str = "") -> dict:
    """Means over questions; `contexts[i]` is question i's gold passage."""
    kb = sorted(set(contexts))
    index = {c: i for i, c in enumerate(kb)}
    pvec = np.asarray(embed(kb), dtype=np.float32)
    qvec = np.asarray(embed([query_prefix + q for q in questions]), dtype=np.float32)
    k = min(top_k, len(kb))
    scores = qvec @ pvec.T
    # Ranked deep enough for recall@5 even when top_k < 5; MRR/nDCG look at the first k only.
    top = np.argsort(-scores, axis=1, kind="stable")[:, :max(k, 5)]
    rows = []
    for gold, ranked in zip(contexts, top):
        ids, rel = [str(i) for i in ranked], {str(index[gold])}
        first = kb[ranked[0]]
        rows.append({
            "context_recall": context_recall([first], [gold], recall_threshold)["fractional"],
            "context_relevance": context_relevance([first], [gold], splitter),
            "recall_at_1": recall_at_k(ids, rel, 1), "recall_at_5": recall_at_k(ids, rel, 5),
            # Named by the requested k, so the keys do not change with the knowledge base's size.
            f"mrr_at_{top_k}": mrr_at_k(ids, rel, k), f"ndcg_at_{top_k}": ndcg_at_k(ids, rel, k),
        })
    out = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    return {"n_queries": len(questions), "n_passages": len(kb), **out}


def to_markdown(before: dict, after: dict) -> str:
    keys = [k for k in before if k not in {"n_queries", "n_passages"}]
    lines = [f"Test split: {before['n_queries']} questions over {before['n_passages']} passages.\n",
             "| metric | before | after | change |", "|---|---:|---:|---:|"]
    lines += [f"| {k} | {100 * before[k]:.2f} | {100 * after[k]:.2f} | {100 * (after[k] - before[k]):+.2f} |"
              for k in keys]
    return "\n".join(lines) + "\n"


def columns_markdown(columns: dict[str, dict]) -> str:
    """The metrics of several embedders on the same test split, one column each, and the change
    of the last over the first."""
    names = list(columns)
    first, last = columns[names[0]], columns[names[-1]]
    keys = [k for k in first if k not in {"n_queries", "n_passages"}]
    lines = [f"Test split: {first['n_queries']} questions over {first['n_passages']} passages.\n",
             "| metric | " + " | ".join(names) + f" | {names[-1]} vs {names[0]} |",
             "|---|" + "---:|" * (len(names) + 1)]
    lines += [f"| {k} | " + " | ".join(f"{100 * columns[n][k]:.2f}" for n in names)
              + f" | {100 * (last[k] - first[k]):+.2f} |" for k in keys]
    return "\n".join(lines) + "\n"
