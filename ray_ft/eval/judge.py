"""LLM-as-judge metrics through a served chat model.

- answer relevance: the judge writes `n_questions` questions that the answer answers; the score
  is the mean clipped cosine between them and the real question (embedded by the eval embedder).
- faithfulness: the judge splits the answer into statements, then gives a verdict per statement
  against the context; the score is the share of supported statements.

Every judge call asks for JSON (structured output where the endpoint enforces it) and validates
the reply; a malformed reply is sent back with what was wrong, up to `max_retries` times. A row
whose judge still fails gets `None` and the error, and the summary counts those rows.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import httpx
import numpy as np

from ray_ft.console import report_progress
from ray_ft.errors import RayFTError
from ray_ft.eval.clients import ChatModel
from ray_ft.metrics.qa import clipped_cosine
from ray_ft.eval.scoring import EmbedFn


class MalformedReply(ValueError):
    """The judge's reply is not the JSON asked for."""


@dataclass(frozen=True)
class JudgeSettings:
    n_questions: int = 3
    max_statements: int = 8
    max_retries: int = 2
    max_tokens: int = 768
    retry_temperature: float = 0.7  # a greedy retry could repeat the same broken reply


def parse_json_object(text: str) -> dict:
    """The first `{...}` object in `text` (models wrap JSON in prose or code fences)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0:
        raise MalformedReply("no JSON object in the reply")
    if end < start:
        raise MalformedReply("unterminated JSON object (reply cut at max_tokens?)")
    try:
        value = json.loads(text[start:end + 1])
    except json.JSONDecodeError as err:
        raise MalformedReply(f"invalid JSON: {err.msg} at char {err.pos}") from None
    if not isinstance(value, dict):
        raise MalformedReply("the reply is not a JSON object")
    return value


def string_list(obj: dict, key: str, min_len: int, max_len: int) -> list[str]:
    """`obj[key]` as a list of non-empty strings with min_len..max_len items."""
    items = obj.get(key)
    if not isinstance(items, list) or not all(isinstance(s, str) and s.strip() for s in items):
        raise MalformedReply(f"'{key}' must be a list of non-empty strings")
    if not min_len <= len(items) <= max_len:
        raise MalformedReply(f"'{key}' must hold {min_len} to {max_len} items, got {len(items)}")
    return [s.strip() for s in items]


def ask_json(chat: ChatModel, prompt: str, schema: dict, validate: Callable[[dict], object],
             s: JudgeSettings):
    """Ask, parse, validate; on a malformed reply ask again with the error. Returns (value, tries)."""
    messages = [{"role": "system", "content": "You are a careful grader. Reply with JSON only."},
                {"role": "user", "content": prompt}]
    last_error = ""
    for attempt in range(s.max_retries + 1):
        reply = chat.chat(messages, s.max_tokens, 0.0 if attempt == 0 else s.retry_temperature,
                          json_schema=schema)
        try:
            return validate(parse_json_object(reply)), attempt + 1
        except MalformedReply as err:
            last_error = str(err)
            messages = [*messages, {"role": "assistant", "content": reply},
                        {"role": "user", "content": f"That reply is not usable ({err}). "
                                                    "Reply again with only the JSON object."}]
    raise MalformedReply(f"{last_error} (after {s.max_retries + 1} attempts)")


def _list_schema(key: str, n_min: int, n_max: int) -> dict:
    # maxLength keeps a model that repeats itself inside a string from running out of tokens.
    return {"type": "object", "required": [key], "additionalProperties": False,
            "properties": {key: {"type": "array",
                                 "items": {"type": "string", "minLength": 1, "maxLength": 120},
                                 "minItems": n_min, "maxItems": n_max}}}


def answer_relevance(chat: ChatModel, embed: EmbedFn, question: str, answer: str, context: str,
                     s: JudgeSettings) -> dict:
    if not answer.strip():
        return {"score": 0.0, "generated_questions": [], "attempts": 0}
    prompt = (f"Write {s.n_questions} different questions that the answer below answers, in the "
              f"answer's language. Use the context only as background.\n"
              f'Reply as {{"questions": [...]}}.\n\nContext: {context}\n\nAnswer: {answer}')
    questions, tries = ask_json(
        chat, prompt, _list_schema("questions", s.n_questions, s.n_questions),
        lambda o: string_list(o, "questions", s.n_questions, s.n_questions), s)
    vecs = np.asarray(embed([question, *questions]))
    cos = clipped_cosine(np.repeat(vecs[:1], len(questions), axis=0), vecs[1:])
    return {"score": float(cos.mean()), "generated_questions": questions, "attempts": tries}


def _verdicts(obj: dict, n: int) -> list[bool]:
    items = obj.get("verdicts")
    if not isinstance(items, list) or len(items) != n or not all(isinstance(v, bool) for v in items):
        raise MalformedReply(f"'verdicts' must be a list of {n} booleans")
    return items


def faithfulness(chat: ChatModel, question: str, answer: str, context: str, s: JudgeSettings) -> dict:
    if not answer.strip():
        return {"score": 0.0, "statements": [], "verdicts": [], "attempts": 0}
    statements, tries1 = ask_json(
        chat,
        f"Split the answer into 1 to {s.max_statements} short standalone statements (each "
        f'understandable without the question).\nReply as {{"statements": [...]}}.\n\n'
        f"Question: {question}\n\nAnswer: {answer}",
        _list_schema("statements", 1, s.max_statements),
        lambda o: string_list(o, "statements", 1, s.max_statements), s)
    numbered = "\n".join(f"{i + 1}. {st}" for i, st in enumerate(statements))
    n = len(statements)
    schema = {"type": "object", "required": ["verdicts"], "additionalProperties": False,
              "properties": {"verdicts": {"type": "array", "items": {"type": "boolean"},
                                          "minItems": n, "maxItems": n}}}
    verdicts, tries2 = ask_json(
        chat,
        f"For each numbered statement, answer true if the context supports it and false "
        f'otherwise.\nReply as {{"verdicts": [true/false, ... one per statement]}}.\n\n'
        f"Context: {context}\n\nStatements:\n{numbered}",
        schema, lambda o: _verdicts(o, n), s)
    return {"score": sum(verdicts) / n, "statements": statements, "verdicts": verdicts,
            "attempts": tries1 + tries2}


def judge_rows(rows: list[dict], chat: ChatModel, embed: EmbedFn, s: JudgeSettings,
               concurrency: int = 8) -> list[dict]:
    """Add `judge_relevance` and `judge_faithfulness` (or None + `judge_<metric>_error`) to each row."""
    def one(r: dict) -> dict:
        out = {}
        for key, fn in (("relevance", lambda: answer_relevance(chat, embed, r["question"],
                                                               r["prediction"], r["context"], s)),
                        ("faithfulness", lambda: faithfulness(chat, r["question"], r["prediction"],
                                                              r["context"], s))):
            try:
                got = fn()
                out[f"judge_{key}"] = got["score"]
                out[f"judge_{key}_detail"] = {k: v for k, v in got.items() if k != "score"}
            except (MalformedReply, RayFTError, httpx.HTTPError) as err:
                # One bad judge call (malformed JSON, a 4xx, a timeout) costs one score, not the run.
                out[f"judge_{key}"] = None
                out[f"judge_{key}_error"] = f"{type(err).__name__}: {err}"
        return out

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for i, (r, extra) in enumerate(zip(rows, pool.map(one, rows)), 1):
            r.update(extra)
            report_progress("eval", i, len(rows), "judge")
    return rows
