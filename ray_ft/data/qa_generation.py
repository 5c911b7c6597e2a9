"""QA pairs written by an LLM from document nodes, in the seed's two steps, then filtered.

    nodes -> step 1: "write n questions this node answers" (JSON {"questions": [...]})
          -> step 2: per question, "answer it from the node alone" (JSON {"answer": "..."})
          -> filters, each drop counted: unparseable reply, too short / too long, the question
             points at "the passage" instead of naming its subject, the question holds its
             answer, the answer is not supported by the node, duplicate / near-duplicate question
          -> rows {id, question, context, answer, node_id, document, page?, heading?}

Both steps run where the engine is, a batch of nodes at a time (`two_steps` in a Ray Data actor
of a `QAWriter`: vLLM, or an endpoint); the driver counts and filters what comes back.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ray_ft.config import QAFilterConfig, QAGenerationConfig

QUESTION_PROMPTS = {
    "en": ("Below is a passage from a document.\n---------------------\n{context}\n---------------------\n"
           "Using this passage alone, with no outside knowledge, write {n} different questions that the passage "
           "answers. Each question must make sense on its own (name what it asks about) and must not contain "
           "its answer. Reply with JSON: {{\"questions\": [\"...\"]}}"),
    "zh": ("下面是一份文档中的一段文字。\n---------------------\n{context}\n---------------------\n"
           "只根据这段文字、不用其他知识，写出 {n} 个这段文字能回答的不同问题。每个问题要能单独看懂（说明问的是什么），"
           "且不能包含答案。用 JSON 回复：{{\"questions\": [\"...\"]}}"),
}
ANSWER_PROMPTS = {
    "en": ("Below is a passage from a document.\n---------------------\n{context}\n---------------------\n"
           "Using this passage alone, with no outside knowledge, answer the question briefly, in the passage's "
           "own words.\nQuestion: {question}\nReply with JSON: {{\"answer\": \"...\"}}"),
    "zh": ("下面是一份文档中的一段文字。\n---------------------\n{context}\n---------------------\n"
           "只根据这段文字、不用其他知识，用原文的词语简短回答问题。\n问题：{question}\n用 JSON 回复：{{\"answer\": \"...\"}}"),
}


def questions_schema(n: int, max_chars: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["questions"],
            "properties": {"questions": {"type": "array", "minItems": n, "maxItems": n,
                                         "items": {"type": "string", "minLength": 1, "maxLength": max_chars}}}}


def answer_schema(max_chars: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["answer"],
            "properties": {"answer": {"type": "string", "minLength": 1, "maxLength": max_chars}}}


def parse_questions(reply: str) -> list[str] | None:
    """The questions of a step-1 reply; None when it is not `{"questions": [str, ...]}`."""
    obj = _json_object(reply)
    qs = obj.get("questions") if obj is not None else None
    if not isinstance(qs, list) or not qs or not all(isinstance(q, str) for q in qs):
        return None
    return [" ".join(q.split()) for q in qs]


def parse_answer(reply: str) -> str | None:
    obj = _json_object(reply)
    a = obj.get("answer") if obj is not None else None
    return " ".join(a.split()) if isinstance(a, str) and a.strip() else None


def _json_object(reply: str) -> dict | None:
    try:
        obj = json.loads(reply)
    except (json.JSONDecodeError, TypeError):
        return None
    return obj if isinstance(obj, dict) else None


# --- filters ---------------------------------------------------------------------------------

# A question that points at its passage ("according to the passage") instead of naming what it
# asks about cannot be answered by retrieving from the whole corpus.
_POINTS_AT_PASSAGE = re.compile(
    r"\b(?:the|this|that|given|above)\s+(?:passage|text|document|excerpt|paragraph|article|section)s?\b"
    r"|\bthe\s+author\b|这段(?:文字|话|材料)|(?:文中|本文|原文|材料中|上文)", re.IGNORECASE)
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def normalized(text: str) -> str:
    """Lower case, punctuation and spaces out: the key questions are compared by."""
    return "".join(_WORD.findall(text.lower()))


def units(text: str) -> list[str]:
    """Latin words, and CJK text as single characters (it has no spaces between words)."""
    out = []
    for w in _WORD.findall(text.lower()):
        out += list(w) if _CJK.search(w) else [w]
    return out


def support(answer: str, node: str) -> float:
    """Share of the answer's words / characters that occur in the node (1.0 for an empty answer)."""
    ans = units(answer)
    if not ans:
        return 1.0
    have = set(units(node))
    return sum(u in have for u in ans) / len(ans)


@dataclass
class GenerationCounts:
    """What generation asked for, got and dropped; it goes into the manifest."""

    nodes: int = 0
    questions_requested: int = 0
    question_requests_failed: int = 0
    question_replies_unparseable: int = 0
    questions_parsed: int = 0
    answer_replies_unparseable: int = 0
    answer_requests_failed: int = 0
    question_too_short: int = 0
    question_too_long: int = 0
    answer_too_short: int = 0
    answer_too_long: int = 0
    question_contains_answer: int = 0
    question_not_self_contained: int = 0
    answer_not_supported: int = 0
    duplicate_question: int = 0
    near_duplicate_question: int = 0
    kept: int = 0
    retries: int = 0
    generated_tokens: int = 0
    wall_s: float = 0.0
    examples: dict[str, str] = field(default_factory=dict)  # one dropped item per reason

    def drop(self, reason: str, what: str) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.examples.setdefault(reason, what[:200])

    def to_dict(self) -> dict:
        d = asdict(self)
        d["questions_per_s"] = round(self.kept / self.wall_s, 3) if self.wall_s else None
        return d


def check_pair(question: str, answer: str, node: str, f: QAFilterConfig, counts: GenerationCounts) -> bool:
    """One (question, answer) against the length, containment and support filters."""
    pair = f"Q: {question} A: {answer}"
    if len(question) < f.min_question_chars:
        counts.drop("question_too_short", pair)
    elif len(question) > f.max_question_chars:
        counts.drop("question_too_long", pair)
    elif len(answer) < f.min_answer_chars:
        counts.drop("answer_too_short", pair)
    elif len(answer) > f.max_answer_chars:
        counts.drop("answer_too_long", pair)
    elif f.self_contained and _POINTS_AT_PASSAGE.search(question):
        counts.drop("question_not_self_contained", pair)
    elif normalized(answer) and normalized(answer) in normalized(question):
        counts.drop("question_contains_answer", pair)
    elif support(answer, node) < f.min_support:
        counts.drop("answer_not_supported", pair)
    else:
        return True
    return False


class Deduper:
    """Drops a question equal to a kept one after normalising (anywhere in the corpus), or close
    to a kept question of the same node (rapidfuzz ratio)."""

    def __init__(self, ratio: float):
        self.ratio, self.seen, self.by_node = ratio, set(), {}

    def keep(self, question: str, node_id: str, counts: GenerationCounts) -> bool:
        from rapidfuzz import fuzz

        key = normalized(question)
        if key in self.seen:
            counts.drop("duplicate_question", question)
            return False
        mine = self.by_node.setdefault(node_id, [])
        if any(fuzz.ratio(key, other) >= self.ratio for other in mine):
            counts.drop("near_duplicate_question", question)
            return False
        self.seen.add(key)
        mine.append(key)
        return True


# --- the two steps ---------------------------------------------------------------------------

# One row per outcome of either step, the columns every writer returns: a step-1 row per node
# (`questions`: how many were parsed, -1 for an unparseable reply) and a step-2 row per question
# (`q`: its place among the node's questions).
OUTCOME_COLUMNS = ("step", "node", "q", "question", "reply", "error", "generated_tokens", "retries", "questions")

Complete = Callable[[list[dict]], list[dict]]
"""An engine: requests {messages, schema, max_tokens} -> one {reply, error, generated_tokens,
retries?} each, in order."""


def question_requests(nodes: list[dict], gen: QAGenerationConfig, language: str) -> list[dict]:
    """Step 1 for `nodes` ({node, text}): write n questions per node."""
    template = gen.question_prompt or QUESTION_PROMPTS[language]
    n = gen.questions_per_node
    return [{"messages": [{"role": "user", "content": template.format(context=nd["text"], n=n)}],
             "schema": questions_schema(n, gen.filters.max_question_chars),
             "max_tokens": n * gen.max_question_tokens + 16} for nd in nodes]


def answer_requests(texts: dict[int, str], asked: list[tuple[int, int, str]], gen: QAGenerationConfig,
                    language: str) -> list[dict]:
    """Step 2 for `asked` ((node, q, question)): answer from the node alone."""
    template = gen.answer_prompt or ANSWER_PROMPTS[language]
    return [{"messages": [{"role": "user", "content": template.format(context=texts[i], question=q)}],
             "schema": answer_schema(gen.filters.max_answer_chars), "max_tokens": gen.max_answer_tokens}
            for i, _, q in asked]


def two_steps(nodes: list[dict], complete: Complete, gen: QAGenerationConfig, language: str) -> list[dict]:
    """Both steps for a batch of nodes ({node, text}) on one engine: its questions, then the
    answers to every question parsed. Runs where the engine is (a Ray Data actor)."""
    rows, asked = [], []
    for nd, out in zip(nodes, complete(question_requests(nodes, gen, language))):
        qs = None if out.get("error") else parse_questions(out["reply"])
        qs = None if qs is None else qs[:gen.questions_per_node]
        rows.append(_outcome("questions", nd["node"], -1, "", out, -1 if qs is None else len(qs)))
        asked += [(nd["node"], k, q) for k, q in enumerate(qs or [])]
    if asked:
        texts = {nd["node"]: nd["text"] for nd in nodes}
        for (i, k, q), out in zip(asked, complete(answer_requests(texts, asked, gen, language))):
            rows.append(_outcome("answers", i, k, q, out, 0))
    return rows


def _outcome(step: str, node: int, q: int, question: str, out: dict, questions: int) -> dict:
    return {"step": step, "node": int(node), "q": q, "question": question, "reply": out.get("reply") or "",
            "error": out.get("error") or "", "generated_tokens": int(out.get("generated_tokens") or 0),
            "retries": int(out.get("retries") or 0), "questions": questions}


def generate_qa(nodes: list[dict], writer, gen: QAGenerationConfig, language: str
                ) -> tuple[list[dict], GenerationCounts]:
    """QA rows for `nodes` (in node order, questions in the order written) and the counts."""
    counts = GenerationCounts(nodes=len(nodes), questions_requested=len(nodes) * gen.questions_per_node)
    t = time.perf_counter()
    outcomes = writer.write([{"node": i, "text": nd["text"]} for i, nd in enumerate(nodes)], gen, language)
    counts.wall_s = time.perf_counter() - t
    outcomes.sort(key=lambda o: (o["node"], o["step"] != "questions", o["q"]))  # batches finish in any order
    answers = []
    for out in outcomes:
        counts.generated_tokens += int(out["generated_tokens"])
        counts.retries = max(counts.retries, int(out["retries"]))  # an endpoint actor counts cumulatively
        if out["step"] == "answers":
            answers.append(out)
        elif out["error"]:
            counts.drop("question_requests_failed", out["error"])
        elif out["questions"] < 0:
            counts.drop("question_replies_unparseable", out["reply"])
    counts.questions_parsed = len(answers)
    return _filtered(nodes, answers, gen.filters, counts), counts


def _filtered(nodes: list[dict], answers: list[dict], f: QAFilterConfig, counts: GenerationCounts) -> list[dict]:
    rows, dedupe = [], Deduper(f.near_duplicate_ratio)
    for out in answers:
        node, question = nodes[int(out["node"])], out["question"]
        if out.get("error"):
            counts.drop("answer_requests_failed", out["error"])
            continue
        answer = parse_answer(out["reply"])
        if answer is None:
            counts.drop("answer_replies_unparseable", out["reply"])
            continue
        if not check_pair(question, answer, node["text"], f, counts):
            continue
        if not dedupe.keep(question, node["node_id"], counts):
            continue
        meta = node["metadata"]
        rows.append({"id": f"{node['node_id']}-q{len(rows)}", "question": question, "context": node["text"],
                     "answer": answer, "node_id": node["node_id"], "document": meta["document"],
                     **{k: meta[k] for k in ("page", "heading") if k in meta}})
    counts.kept = len(rows)
    return rows
