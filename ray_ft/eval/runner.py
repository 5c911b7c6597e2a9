"""Run an eval set through the served RAG graph, per model and per context mode, and score it.

Modes: "gold" sends the question's own passage, the recipe's 100%-recall control; "retrieved"
lets the served retriever's first stage pick the passages, "reranked" its candidates reordered by
the served reranker (both from one deployment, per request). Targets are models the ingress serves (base, the
fine-tuned adapter) or any OpenAI-compatible endpoint: for those the prompt is built here, with
the same template and the same contexts (`/v1/retrieve` in retrieved mode), and sent to their
`/chat/completions`. Requests go out concurrently so an engine batches them, ordered by passage
so its prefix cache is reused. Outputs (predictions.jsonl, summary.json, summary.md, PNGs) are
written atomically.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path


from ray_ft.config import EvalConfig
from ray_ft.console import report_progress
from ray_ft.errors import RayFTError
from ray_ft.eval.clients import ChatModel, RAGClient, RequestRejected
from ray_ft.eval.judge import JudgeSettings, judge_rows
from ray_ft.train.learning_curve import curve_points, plot_learning_curve
from ray_ft.train.learning_curve import to_markdown as learning_curve_markdown
from ray_ft.metrics.retrieval import SENTENCE_SPLITTERS
from ray_ft.plots import plot_loss
from ray_ft.eval.html_report import write_html_report
from ray_ft.eval.report import plot_metrics, summarize, to_markdown
from ray_ft.eval.scoring import score_rows
from ray_ft.io import write_jsonl_atomic, write_text_atomic
from ray_ft.serve.prompting import RAGPrompt

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalTarget:
    label: str  # how the report names it ("base", "finetuned", an endpoint's label)
    served_name: str  # the `model` field sent
    external: ChatModel | None = None  # set for an endpoint outside the graph


@dataclass(frozen=True)
class PromptSettings:
    """How a RAG request becomes a chat for external targets (the ingress does the same)."""

    language: str
    system_prompt: str
    max_tokens: int
    template: str | None = None  # serve.prompt_template ({context_str}, {query}); None: training's
    training_template: str | None = None  # data.prompt_template ({context}, {question}), if set


def _ask(client: RAGClient, target: EvalTarget, item: dict, mode: str, prompt: PromptSettings) -> dict:
    """One answer: `answer`, `contexts` [{node_id, text}], `model`, `latency_s`, `completion_tokens`."""
    gold = [item["context"]] if mode == "gold" else None
    rerank = None if gold else mode == "reranked"  # one deployment serves both retrieval modes
    if target.external is None:
        out = client.rag(item["question"], target.served_name, contexts=gold,
                         **({} if rerank is None else {"rerank": rerank}))
        return {"answer": out["answer"], "contexts": out["contexts"], "model": out["model"],
                "latency_s": out["retrieval_latency_s"] + out["generation_latency_s"],
                "completion_tokens": out["completion_tokens"]}
    t0 = time.perf_counter()
    contexts = ([{"node_id": None, "text": gold[0]}] if gold
                else client.retrieve(item["question"], rerank=rerank)["contexts"])
    messages = RAGPrompt(prompt.language, prompt.system_prompt, prompt.template,
                         prompt.training_template).messages(
        [c["text"] for c in contexts], item["question"])
    answer = target.external.chat(messages, prompt.max_tokens)
    return {"answer": answer, "contexts": contexts, "model": target.served_name,
            "latency_s": time.perf_counter() - t0, "completion_tokens": None}


def predict(client: RAGClient, items: list[dict], target: EvalTarget, mode: str, concurrency: int,
            prompt: PromptSettings) -> tuple[list[dict], float]:
    """One answer per item, and the wall time it took; rows carry what the scorer needs."""
    def one(i: int) -> dict:
        it = items[i]
        t0 = time.perf_counter()
        try:
            out = _ask(client, target, it, mode, prompt)
        except RequestRejected as err:
            # Refused for its content (e.g. the prompt exceeds the context): it scores 0 and the
            # run goes on; the row keeps the reason, the summary counts these.
            log.warning("%s/%s: question %s not answered: %s", target.label, mode, it["id"], err)
            out = {"answer": "", "contexts": [], "model": target.served_name, "error": str(err),
                   "latency_s": time.perf_counter() - t0, "completion_tokens": None}
        return {**({"error": out["error"]} if "error" in out else {}),
            "id": it["id"], "model": target.label, "served_model": out["model"], "mode": mode,
            "question": it["question"], "references": it["answers"], "prediction": out["answer"],
            "context": "\n\n".join(c["text"] for c in out["contexts"]),
            "gold_passage_id": it["passage_id"],
            "retrieved_ids": [c["node_id"] for c in out["contexts"] if c["node_id"]],
            "latency_s": out["latency_s"], "completion_tokens": out["completion_tokens"],
            **({"retrieved_texts": [c["text"] for c in out["contexts"]],
                "retrieved_scores": [c["score"] for c in out["contexts"]], "gold_context": it["context"]}
               if mode != "gold" else {}),
        }

    t0 = time.perf_counter()
    done = []

    def answered(_):
        done.append(1)
        report_progress("eval", len(done), len(items), f"{target.label}/{mode}")

    rows = run_by_passage(items, one, concurrency, on_done=answered)
    return sorted(rows, key=lambda r: r["id"]), time.perf_counter() - t0


def run_by_passage(items: list[dict], ask, concurrency: int, on_done=None) -> list:
    """`ask(i)` for every item, `concurrency` at a time, passage by passage: a passage's first
    question goes alone, and when it is answered the passage's other questions go next, ahead of
    the first questions of passages not started yet. The engine's prefix cache then holds the
    passage when its other questions come (requests that arrive together are all prefilled from
    scratch), and it only ever needs room for about `concurrency` passages: sending every first
    question before any second one needed the whole eval set's passages to stay cached (652
    CMRC2018 questions over 170 ~1,000-token passages are ~4 GB of SmolLM2 KV cache)."""
    by_passage: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_passage.setdefault(it["passage_id"], []).append(i)
    firsts = deque(idx[0] for idx in by_passage.values())
    rest_of = {idx[0]: idx[1:] for idx in by_passage.values()}
    follow: deque[int] = deque()
    results, in_flight = [], {}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        while firsts or follow or in_flight:
            while len(in_flight) < concurrency and (follow or firsts):
                i = follow.popleft() if follow else firsts.popleft()
                in_flight[pool.submit(ask, i)] = i
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                i = in_flight.pop(future)
                results.append(future.result())
                follow.extend(rest_of.get(i, ()))
                if on_done:
                    on_done(i)
    return results


def check_served(client: RAGClient, targets: list[EvalTarget]) -> None:
    served = set(client.models())
    missing = [t.served_name for t in targets if t.external is None and t.served_name not in served]
    if missing:
        raise RayFTError(f"models not served: {missing}; served: {sorted(served)}")


def run_eval(client: RAGClient, items: list[dict], targets: list[EvalTarget], ecfg: EvalConfig,
             prompt: PromptSettings, out_dir: Path, judge: ChatModel | None = None,
             loss_history: list[dict] | None = None, served_as: dict[str, str] | None = None,
             notes: list[str] | None = None) -> list[dict]:
    """Predict and score every (target, mode); judge a sample; write the report files.
    `loss_history` (the training steps) adds the loss plot and the learning curve; `served_as`
    says per label how the model was served; `notes` are lines for the report."""
    check_served(client, targets)
    rows: list[dict] = []
    wall_s: dict[tuple[str, str], float] = {}
    for mode in ecfg.modes:
        for target in targets:
            got, wall_s[(target.label, mode)] = predict(client, items, target, mode,
                                                        ecfg.concurrency, prompt)
            rows.extend(got)
    rows = score_rows(rows, client.embed, splitter=SENTENCE_SPLITTERS[prompt.language])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows)  # kept even if judging is cut short
    if judge is not None:
        judged_ids = {it["id"] for it in items[:ecfg.judge.max_samples]}
        settings = JudgeSettings(n_questions=ecfg.judge.n_questions, max_retries=ecfg.judge.max_retries)
        judge_rows([r for r in rows if r["id"] in judged_ids], judge, client.embed, settings,
                   ecfg.concurrency)
    table = summarize(rows, wall_s, served_as)
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows)
    write_text_atomic(out_dir / "summary.json", json.dumps(table, indent=2, ensure_ascii=False))
    images, notes = [], list(notes or [])
    if loss_history and curve_points(loss_history):
        notes.append(learning_curve_markdown(loss_history))
    if ecfg.plots:
        images.append(plot_metrics(table, out_dir / "metrics.png").name)
        if loss_history:
            images.append(plot_loss(loss_history, out_dir / "loss.png").name)
            images.append(_learning_curve_image(loss_history, out_dir))
    images = [i for i in images if i]
    write_text_atomic(out_dir / "summary.md", to_markdown(table, images=images, notes=notes))
    write_html_report(out_dir, table, rows, [out_dir / i for i in images], notes,
                      title=f"{out_dir.parent.name}: evaluation")
    return table


def _learning_curve_image(history: list[dict], out_dir: Path) -> str | None:
    """The train stage's learning_curve.png beside this eval folder when it is there (linked),
    else one drawn here; None without validations."""
    trained = out_dir.parent / "train" / "learning_curve.png"
    if trained.is_file():
        return f"../train/{trained.name}"
    drawn = plot_learning_curve(history, out_dir / "learning_curve.png")
    return drawn.name if drawn else None
