"""Hard-negative mining (FlagEmbedding's hn_mine recipe) on a Ray Data embedding job.

The candidate pool (the training passages) and the queries are embedded on an actor pool; each
query is ranked against the pool by exact cosine. Negatives are sampled, seeded per query, from
ranks [lo, hi) of that ranking with the query's positives removed: skipping the very top leaves
out unlabeled positives (near-duplicates of the answer passage), and sampling rather than taking
the top ones keeps the negatives varied. A query with too few candidates in the window is filled
up with random passages (counted).
"""

from __future__ import annotations

import random

import numpy as np

from ray_ft.config import HardNegativeConfig
from ray_ft.data.retrieval import embed_corpus_and_queries, top_n
from ray_ft.data.split import order_key
from ray_ft.data.triplets import QAPair, random_negatives


def mine_hard_negatives(pairs: list[QAPair], neg_num: int, seed: int, hcfg: HardNegativeConfig,
                        model_dir: str, workers: int) -> tuple[dict[tuple[str, str], list[str]], dict]:
    """({(question, context): negatives}, stats). The pool is the pairs' distinct contexts."""
    pool = sorted({p.context for p in pairs})
    lo, hi = hcfg.range_for_sampling
    queries = sorted({(p.question, p.context) for p in pairs})
    pool_vecs, query_vecs = embed_corpus_and_queries(pool, [q for q, _ in queries], model_dir,
                                                     hcfg.query_instruction, workers)
    ids, _ = top_n(query_vecs, pool_vecs, hi)
    positives: dict[str, set[str]] = {}
    for p in pairs:  # a question asked of several passages has all of them as positives
        positives.setdefault(p.question, set()).add(p.context)
    out: dict[tuple[str, str], list[str]] = {}
    filled = 0
    ranks = []
    for (question, context), row in zip(queries, ids):
        pos = positives[question]
        window = [(r, pool[j]) for r, j in enumerate(row) if lo <= r < hi and pool[j] not in pos]
        rng = random.Random(order_key(seed, question + "\0" + context))
        if len(window) >= neg_num:
            chosen = rng.sample(window, neg_num)
            ranks += [r for r, _ in chosen]
            neg = [t for _, t in chosen]
        else:
            neg = [t for _, t in window]
            ranks += [r for r, _ in window]
            neg += random_negatives(pool, pos | set(neg), neg_num - len(neg), rng)
            filled += 1
        out[(question, context)] = neg
    stats = {"queries": len(queries), "pool": len(pool), "range_for_sampling": [lo, hi],
             "queries_filled_randomly": filled,
             "mean_sampled_rank": round(float(np.mean(ranks)), 1) if ranks else None}
    return out, stats
