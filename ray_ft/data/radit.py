"""RA-DIT-style augmentation: train the generator on the passages the retriever returns.

For each training (question, answer), the embedder retrieves the top-k passages of the training
split; `separate_context` gives k examples (question + passage_i -> answer), else one example
with the k passages joined. Every example names the passages it was built from (`context_ids`),
and the manifest counts how often the question's own passage was among them.
"""

from __future__ import annotations

from ray_ft.config import RetrievalAugmentConfig
from ray_ft.data.examples import qa_row
from ray_ft.data.records import QARecord
from ray_ft.data.retrieval import embed_corpus_and_queries, top_n
from ray_ft.data.templates import join_contexts


def augment_with_retrieval(records: list[QARecord], rcfg: RetrievalAugmentConfig, embedder_dir: str,
                           workers: int) -> tuple[list[dict], dict]:
    """(build rows, stats) for `records`, retrieving from the passages of `records` themselves."""
    passages = {r.passage_id: r.context for r in records}
    pids = sorted(passages)
    corpus, queries = embed_corpus_and_queries([passages[p] for p in pids], [r.question for r in records],
                                               embedder_dir, rcfg.query_instruction, workers)
    ids, _ = top_n(queries, corpus, rcfg.top_k)
    rows: list[dict] = []
    gold_top1 = gold_topk = answer_in = 0
    for rec, hit in zip(records, ids):
        hit_pids = [pids[j] for j in hit]
        gold_top1 += hit_pids[0] == rec.passage_id
        gold_topk += rec.passage_id in hit_pids
        if rcfg.separate_context:
            for rank, pid in enumerate(hit_pids):
                rows.append(qa_row(rec, [pid], passages[pid], f"{rec.id}#r{rank}"))
                answer_in += rec.answers[0] in passages[pid]
        else:
            joined = join_contexts([passages[p] for p in hit_pids])
            rows.append(qa_row(rec, hit_pids, joined, f"{rec.id}#top{len(hit_pids)}"))
            answer_in += rec.answers[0] in joined
    n = max(len(records), 1)
    stats = {"questions": len(records), "corpus_passages": len(pids), "examples": len(rows),
             "embedder": rcfg.embedder, "query_instruction": rcfg.query_instruction,
             "top_k": rcfg.top_k, "separate_context": rcfg.separate_context,
             "gold_at_1": round(gold_top1 / n, 4), "gold_in_top_k": round(gold_topk / n, 4),
             "examples_with_answer_in_context": round(answer_in / max(len(rows), 1), 4)}
    return rows, stats
