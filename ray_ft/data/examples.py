"""SFT examples from QA rows or conversations: template, tokenize, fit into `cutoff_len`.

A QA example longer than `cutoff_len` is never cut inside its answer: with `truncation:
shorten_context` the context is cut to a window of its tokens around the answer span (the head of
the context when the answer is not a span of it, e.g. abstractive answers or retrieved passages
without it); if even that cannot fit, or with `truncation: drop`, the example is dropped. A
conversation (Alpaca/messages) that is too long is dropped. Each outcome is counted by `status`.

`ExampleBuilder` is plain Python (the bench's single-process baseline uses it directly);
`BuildBatch` wraps it as the Ray Data callable of the prepare stage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow as pa

from ray_ft.data.records import EXPORTERS, Conversation, QARecord, Turn, qa_to_conversation
from ray_ft.data.split import order_key
from ray_ft.data.tokenize import TokenizedExample, tokenize_conversation

OK, SHORTENED, DROPPED, DROPPED_ANSWER = "ok", "shortened_context", "dropped_over_cutoff_len", "dropped_answer_too_long"

# The columns of a training shard; the builder adds what the summary pass and exports need.
TRAIN_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("passage_id", pa.string()),
    ("input_ids", pa.list_(pa.int32())),
    ("labels", pa.list_(pa.int32())),
    ("num_tokens", pa.int32()),
    ("order", pa.string()),
])
BUILT_SCHEMA = pa.schema(list(TRAIN_SCHEMA) + [
    ("status", pa.string()),
    ("context", pa.string()),  # the context the example was built with ("" for conversations)
    ("answers", pa.list_(pa.string())),
    ("record", pa.string()),  # the example as an Alpaca/messages JSON record (+ provenance)
])


@dataclass(frozen=True)
class ExampleSettings:
    system_prompt: str
    language: str
    template: str | None
    cutoff_len: int
    truncation: str  # "shorten_context" | "drop"
    sft_format: str  # "alpaca" | "messages": the form of the `record` column
    seed: int


def chat_row(conv: Conversation) -> dict:
    """A conversation as a flat row (Ray Data blocks hold columns, not nested dataclasses)."""
    return {"id": conv.id, "passage_id": conv.group, "system": conv.system,
            "users": [t.user for t in conv.turns], "assistants": [t.assistant for t in conv.turns],
            "train_turns": [t.train for t in conv.turns]}


def conversation_of_row(row: dict) -> Conversation:
    turns = tuple(Turn(u, a, bool(t)) for u, a, t in zip(row["users"], row["assistants"], row["train_turns"]))
    return Conversation(str(row["id"]), str(row["passage_id"]), row.get("system"), turns)


def qa_row(rec: QARecord, context_ids: list[str] | None = None, context: str | None = None,
           example_id: str | None = None) -> dict:
    """A QA record as a build row; RA-DIT rows replace the context and name where it came from."""
    row = rec.to_row()
    if context is not None:
        row["context"], row["answer_start"] = context, -1
    row["id"] = example_id or rec.id
    row["context_ids"] = context_ids if context_ids is not None else [rec.passage_id]
    return row


class ExampleBuilder:
    def __init__(self, tokenizer, settings: ExampleSettings):
        self.tok, self.s = tokenizer, settings

    def _tokenize(self, conv: Conversation) -> TokenizedExample:
        return tokenize_conversation(self.tok, conv.messages(self.s.system_prompt), [t.train for t in conv.turns])

    def build(self, row: dict) -> dict:
        return self.build_qa(row) if "question" in row else self.build_chat(row)

    def build_chat(self, row: dict) -> dict:
        conv = conversation_of_row(row)
        ex = self._tokenize(conv)
        status = OK if len(ex.input_ids) <= self.s.cutoff_len else DROPPED
        return self._out(conv, ex, status, "", [conv.turns[-1].assistant], {})

    def build_qa(self, row: dict) -> dict:
        rec = QARecord(str(row["id"]), str(row["passage_id"]), row["context"], row["question"],
                       tuple(row["answers"]), int(row.get("answer_start", -1)))
        conv = qa_to_conversation(rec, self.s.language, self.s.template)
        ex, status, context = self._tokenize(conv), OK, rec.context
        if len(ex.input_ids) > self.s.cutoff_len:
            status = DROPPED
            if self.s.truncation == "shorten_context":
                ex, status, context = self._shorten(rec, len(ex.input_ids))
            if ex is not None:
                conv = qa_to_conversation(rec, self.s.language, self.s.template, context)
        meta = {"context_ids": list(row.get("context_ids") or [rec.passage_id])}
        return self._out(conv, ex, status, context, list(rec.answers), meta)

    def _shorten(self, rec: QARecord, n_tokens: int) -> tuple[TokenizedExample | None, str, str]:
        """Cut the context to a token window around the answer so the example fits."""
        enc = self.tok(rec.context, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
        n = len(offsets)
        answer = rec.answers[0]
        start = rec.answer_start if rec.answer_start >= 0 else rec.context.find(answer)
        span = None
        if start >= 0:
            end = start + len(answer)
            inside = [i for i, (a, b) in enumerate(offsets) if b > start and a < end]
            span = (inside[0], inside[-1] + 1) if inside else None
        # Tokens of a cut context can re-merge at its edges: retry with a growing margin.
        for margin in (2, 8, 32):
            keep = n - (n_tokens - self.s.cutoff_len) - margin
            if keep <= 0 or (span and span[1] - span[0] > keep):
                return None, DROPPED_ANSWER if span else DROPPED, rec.context
            lo = 0 if span is None else max(0, min(span[0] - (keep - (span[1] - span[0])) // 2, n - keep))
            context = rec.context[offsets[lo][0]: offsets[lo + keep - 1][1]]
            ex = self._tokenize(qa_to_conversation(rec, self.s.language, self.s.template, context))
            if len(ex.input_ids) <= self.s.cutoff_len:
                return ex, SHORTENED, context
        return None, DROPPED, rec.context

    def _out(self, conv: Conversation, ex: TokenizedExample | None, status: str, context: str,
             answers: list[str], meta: dict) -> dict:
        record = {**EXPORTERS[self.s.sft_format](conv), **meta}
        if status not in (OK, SHORTENED):
            ex = None  # a dropped example carries no tokens: shard selection keeps num_tokens > 0
        return {"id": conv.id, "passage_id": conv.group,
                "input_ids": ex.input_ids if ex else [], "labels": ex.labels if ex else [],
                "num_tokens": len(ex.input_ids) if ex else 0, "order": order_key(self.s.seed, conv.id),
                "status": status, "context": context, "answers": answers,
                "record": json.dumps(record, ensure_ascii=False)}


def rows_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=BUILT_SCHEMA)


class BuildBatch:
    """Ray Data callable: one tokenizer per actor; a batch of QA or chat rows -> built examples."""

    def __init__(self, model_dir: str, settings: ExampleSettings):
        from transformers import AutoTokenizer

        self.builder = ExampleBuilder(AutoTokenizer.from_pretrained(model_dir), settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return rows_table([self.builder.build(row) for row in batch.to_pylist()])
