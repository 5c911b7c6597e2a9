"""Preference pairs from the model's own mistakes (`ray-ft pairs JOB.yaml`).

The served graph answers the *training* questions of the prepared data (`train_questions.jsonl`,
the questions the SFT set was built from; never a held-out one, so the eval set stays unseen by
DPO too), each with its own passage as the context: a training passage is not in the knowledge
base (that holds the held-out ones), and the pair must hold the prompt the generator saw. Every
answer scoring below `max_f1` (CMRC F1 against the references) becomes a pair in the layout the
preference reader takes: prompt = the chat the generator saw (system + RAG user turn), chosen =
the reference answer, rejected = the model's answer. With `samples > 1` each question also gets
answers sampled at `temperature`; only distinct ones count.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_ft.config.train import PairMiningConfig
from ray_ft.data.evalset import normalized
from ray_ft.eval.clients import RAGClient, RequestRejected
from ray_ft.eval.runner import run_by_passage
from ray_ft.io import write_jsonl_atomic, write_text_atomic
from ray_ft.metrics.qa import cmrc_f1
from ray_ft.serve.prompting import RAGPrompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MinedPairs:
    pairs: list[dict]
    questions: int  # asked
    answers: int  # distinct answers received
    below_threshold: int  # of those, scored under max_f1 (each one a pair)
    rejected_requests: int  # refused by the server (e.g. prompt too long)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "pairs"} | {"pairs": len(self.pairs)}


def mine_pairs(client: RAGClient, items: list[dict], served_name: str, prompt: RAGPrompt,
               mining: PairMiningConfig, max_tokens: int) -> MinedPairs:
    """Ask every item, keep the low-scoring answers as pairs (in item order)."""
    def ask(i: int) -> tuple[int, list[str], int]:
        it, answers, refused = items[i], [], 0
        for s in range(mining.samples):
            try:
                out = client.rag(it["question"], served_name, contexts=[it["context"]], max_tokens=max_tokens,
                                 temperature=0.0 if s == 0 else mining.temperature)
            except RequestRejected as err:
                log.warning("pairs: question %s not answered: %s", it["id"], err)
                refused += 1
                continue
            if out["answer"].strip() and normalized(out["answer"]) not in {normalized(a) for a in answers}:
                answers.append(out["answer"])
        return i, answers, refused

    results = sorted(run_by_passage(items, ask, mining.concurrency))
    pairs, n_answers, refused = [], 0, 0
    for i, answers, n_refused in results:
        it = items[i]
        refused += n_refused
        n_answers += len(answers)
        chosen = it["answers"][0]
        messages = prompt.messages([it["context"]], it["question"])
        for k, answer in enumerate(answers):
            f1 = cmrc_f1(answer, it["answers"])
            if f1 >= mining.max_f1 or normalized(answer) == normalized(chosen):
                continue
            pairs.append({"id": f"{it['id']}#{k}", "prompt": messages, "chosen": chosen, "rejected": answer,
                          "f1": round(f1, 4), "question_id": it["id"]})
    return MinedPairs(pairs, len(items), n_answers, len(pairs), refused)


def write_pairs(mined: MinedPairs, out_dir: Path, served_name: str, mining: PairMiningConfig) -> Path:
    """`out_dir/pairs.jsonl` (the preference reader's layout) and `out_dir/summary.json`."""
    path = out_dir / "pairs.jsonl"
    write_jsonl_atomic(path, mined.pairs)
    summary = {"answered_by": served_name, "mining": mining.model_dump(), **mined.summary()}
    write_text_atomic(out_dir / "summary.json", json.dumps(summary, indent=2))
    return path
