"""The data of LM-supervised retrieval (RA-DIT's retriever half): candidates and the LM's scores.

For each training question with a reference answer: the current embedder's top-k passages of the
training pool (an embedding job on Ray Data, exact search), then, on a Ray Data actor pool that
loads the generator once per actor, the log-likelihood of the reference answer given the RAG
prompt with each single passage, tokenized exactly as SFT tokenizes a RAG example (the chat
template, the answer as the assistant turn). The scores go to `lsr_scores.parquet`, one row per
(question, candidate), for the trainer and for a user to see which passages the LM found useful.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from ray_ft.data.retrieval import embed_corpus_and_queries, local_path, top_n
from ray_ft.data.split import seeded_sample
from ray_ft.errors import RayFTError


@dataclass(frozen=True)
class LSRGroup:
    """One training question, its candidates (best first) and, once scored, the LM's judgement."""

    query: str
    answer: str
    gold: str  # the question's own passage
    candidates: list[str]
    retrieval_scores: list[float]
    lm_logprobs: list[float] = field(default_factory=list)  # log p(answer | prompt with candidate j)
    answer_tokens: int = 0

    @property
    def gold_index(self) -> int:
        """Where the question's own passage is among the candidates; -1 when not retrieved."""
        return self.candidates.index(self.gold) if self.gold in self.candidates else -1

    def lm_scores(self, mode: str) -> list[float]:
        """`mean_logprob`: per answer token; `logprob`: the answer's total."""
        if mode == "mean_logprob":
            return [lp / max(1, self.answer_tokens) for lp in self.lm_logprobs]
        return list(self.lm_logprobs)


def softmax(scores: list[float], temperature: float) -> list[float]:
    top = max(scores)
    e = [math.exp((s - top) / temperature) for s in scores]
    total = sum(e)
    return [x / total for x in e]


def lsr_questions(triplets: list[dict], max_queries: int | None, seed: int) -> list[dict]:
    """The training triplets that have a reference answer, a seeded sample of `max_queries`."""
    answered = [t for t in triplets if str(t.get("answer") or "").strip()]
    if not answered:
        raise RayFTError("embed.lsr: no training question has an answer; LM-supervised retrieval scores the "
                         "reference answer (a CSV embed.source with an `answer` column, or triplets with `answer`)")
    return seeded_sample(answered, lambda t: t["query"] + "\0" + t["pos"][0], max_queries, seed)


def retrieve_candidates(questions: list[dict], pool: list[str], model_dir: str, instruction: str, k: int,
                        workers: int = 1) -> list[LSRGroup]:
    """Each question's top-k passages of `pool` (the training passages, as RA-DIT retrieves
    from the whole corpus, not only from the scored questions' own passages)."""
    pool = sorted(set(pool))
    if len(pool) < k:
        raise RayFTError(f"embed.lsr.candidates={k}: the training pool has only {len(pool)} passages")
    pool_vecs, query_vecs = embed_corpus_and_queries(pool, [t["query"] for t in questions], model_dir,
                                                     instruction, workers)
    ids, scores = top_n(query_vecs, pool_vecs, k)
    return [LSRGroup(t["query"], str(t["answer"]), t["pos"][0], [pool[j] for j in row], [float(s) for s in sc])
            for t, row, sc in zip(questions, ids, scores)]


class AnswerLogLikelihood:
    """Ray Data callable: log p(answer | RAG prompt with one passage) under a causal LM, summed
    over the answer's tokens (the labels SFT trains on), and the number of those tokens."""

    def __init__(self, lm_dir: str, prompt, max_len: int, threads: int = 1, use_gpu: bool = False,
                 dtype: str = "float32"):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(max(1, threads))
        self.device = "cuda" if use_gpu else "cpu"
        self.tok = AutoTokenizer.from_pretrained(lm_dir)
        if dtype == "auto":  # bf16 where it is computed natively (GPU, AVX512-BF16/AMX CPUs)
            from ray_ft.devices import cpu_has_native_bf16

            dtype = "bfloat16" if use_gpu or cpu_has_native_bf16() else "float32"
        self.model = AutoModelForCausalLM.from_pretrained(lm_dir, dtype=getattr(torch, dtype)).to(self.device).eval()
        self.prompt, self.max_len = prompt, max_len
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters

    def example(self, passage: str, question: str, answer: str):
        """SFT's tokenization of the example; a passage too long for `max_len` is cut (by the
        share of tokens over), so the answer is always scored whole."""
        from ray_ft.data.tokenize import tokenize_conversation

        for _ in range(4):
            messages = self.prompt.messages([passage], question) + [{"role": "assistant", "content": answer}]
            ex = tokenize_conversation(self.tok, messages)
            over = len(ex.input_ids) - self.max_len
            if over <= 0 or not passage:
                return ex
            ids = self.tok(passage, add_special_tokens=False)["input_ids"]
            passage = self.tok.decode(ids[:max(0, len(ids) - over - 8)])
        return ex

    def __call__(self, batch: dict) -> dict:
        import numpy as np
        import torch

        from ray_ft.data.tokenize import IGNORE_INDEX, trained_positions

        exs = [self.example(str(p), str(q), str(a)) for p, q, a in zip(batch["passage"], batch["query"], batch["answer"])]
        width = max(len(e.input_ids) for e in exs)
        pad = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        ids = torch.full((len(exs), width), pad, dtype=torch.long)
        labels = torch.full((len(exs), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(exs), width), dtype=torch.long)
        for i, e in enumerate(exs):  # right padding: positions (and so logits) as in one-by-one passes
            n = len(e.input_ids)
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(e.input_ids), torch.tensor(e.labels), 1
        # The head and the softmax only where a next token is an answer token: most of a prompt is
        # passage, and the head is a fifth of a small LM's multiply-adds per token.
        positions = trained_positions(labels) if self.keeps_logits else torch.arange(width - 1)
        extra = {"logits_to_keep": positions.to(self.device)} if self.keeps_logits else {}
        with torch.no_grad():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **extra).logits
        logits = logits[:, : len(positions)].float()  # the full-sequence path also has the last position
        target = labels[:, positions + 1].to(self.device)
        keep = target != IGNORE_INDEX
        logp = torch.log_softmax(logits, dim=-1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total = (logp * keep).sum(1).cpu().numpy().astype(np.float64)
        return {"g": batch["g"], "j": batch["j"], "logprob": total, "tokens": keep.sum(1).cpu().numpy()}


def score_groups(groups: list[LSRGroup], lm_dir: str, prompt, max_len: int, batch_size: int,
                 workers: int = 1, cpus: float = 1, use_gpu: bool = False, dtype: str = "float32") -> list[LSRGroup]:
    """The groups with `lm_logprobs` of every candidate, from a Ray Data job on `workers` actors."""
    import ray

    lm_dir = local_path(lm_dir)
    rows = [{"g": g, "j": j, "query": grp.query, "answer": grp.answer, "passage": c}
            for g, grp in enumerate(groups) for j, c in enumerate(grp.candidates)]
    # Similar lengths in a batch pad less (the results are put back in place by g, j).
    rows.sort(key=lambda r: len(r["passage"]) + len(r["query"]) + len(r["answer"]))
    blocks = max(workers, -(-len(rows) // (8 * batch_size)))
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    out = ds.map_batches(
        AnswerLogLikelihood, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus, num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"lm_dir": lm_dir, "prompt": prompt, "max_len": max_len,
                               "threads": max(1, int(cpus)), "use_gpu": use_gpu, "dtype": dtype})
    logprobs = [[0.0] * len(g.candidates) for g in groups]
    tokens = [0] * len(groups)
    seen = 0
    for b in out.iter_batches(batch_format="numpy", batch_size=None):
        for g, j, lp, n in zip(b["g"], b["j"], b["logprob"], b["tokens"]):
            logprobs[int(g)][int(j)], tokens[int(g)] = float(lp), int(n)
            seen += 1
    if seen != len(rows):
        raise RuntimeError(f"LM scoring returned {seen} of {len(rows)} rows")
    return [replace(grp, lm_logprobs=lp, answer_tokens=n) for grp, lp, n in zip(groups, logprobs, tokens)]


def lsr_rows(groups: list[LSRGroup], mode: str, lm_temperature: float) -> list[dict]:
    """One row per (question, candidate): what `lsr_scores.parquet` holds."""
    out = []
    for g, grp in enumerate(groups):
        scores = grp.lm_scores(mode)
        target = softmax(scores, lm_temperature)
        for j, (c, rs, lp) in enumerate(zip(grp.candidates, grp.retrieval_scores, grp.lm_logprobs)):
            out.append({"question_id": g, "query": grp.query, "answer": grp.answer, "rank": j, "passage": c,
                        "is_gold": c == grp.gold, "retrieval_score": rs, "lm_logprob": lp,
                        "answer_tokens": grp.answer_tokens, "lm_score": scores[j], "lm_target": target[j]})
    return out


def write_parquet_atomic(rows: list[dict], path: Path, metadata: dict[str, str] | None = None) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(rows)
    if metadata:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), **metadata})
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    tmp.replace(path)
    return path


def scores_key(groups: list[LSRGroup], lm_dir: str, prompt, max_len: int, dtype: str) -> str:
    """What the LM's scores depend on: the questions, answers, candidates, LM, prompt, length, dtype."""
    body = [[g.query, g.answer, g.candidates] for g in groups]
    return hashlib.sha256(json.dumps([body, lm_dir, repr(prompt), max_len, dtype]).encode()).hexdigest()[:16]


def read_scores(path: Path, groups: list[LSRGroup], key: str) -> list[LSRGroup] | None:
    """The groups with the LM scores of an earlier run when `path` was written under `key`."""
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError):
        return None
    if (table.schema.metadata or {}).get(b"key") != key.encode():
        return None
    logprobs: dict[int, dict[int, float]] = {}
    tokens: dict[int, int] = {}
    for r in table.select(["question_id", "rank", "lm_logprob", "answer_tokens"]).to_pylist():
        logprobs.setdefault(r["question_id"], {})[r["rank"]] = r["lm_logprob"]
        tokens[r["question_id"]] = r["answer_tokens"]
    if len(logprobs) != len(groups):
        return None
    return [replace(g, lm_logprobs=[logprobs[i][j] for j in range(len(g.candidates))], answer_tokens=tokens[i])
            for i, g in enumerate(groups)]


def training_table(groups: list[LSRGroup], mode: str) -> list[dict]:
    """One row per question for the trainer: query, candidates, their LM scores, the gold index."""
    return [{"query": g.query, "candidates": list(g.candidates), "lm_scores": g.lm_scores(mode),
             "gold_index": g.gold_index} for g in groups]
