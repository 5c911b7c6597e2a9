"""The two record kinds every reader produces, and the conversions between data formats.

- `QARecord`: one question over one passage (SQuAD JSON, QA CSV, HF QA rows). Splits group by
  `passage_id`; the eval set and knowledge base are made of these.
- `Conversation`: one SFT example of one or more (user, assistant) turns (Alpaca, OpenAI
  messages, or a QA record rendered through the prompt template).

Alpaca <-> messages conversion goes through `Conversation`: messages -> Alpaca -> messages is the
identity; Alpaca -> messages joins `instruction` and `input` with a newline (as LLaMA-Factory does),
so it comes back with `input` folded into `instruction`.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from ray_ft.data.templates import build_prompt


def passage_id_of(context: str) -> str:
    return hashlib.sha1(context.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class QARecord:
    id: str
    passage_id: str
    context: str
    question: str
    answers: tuple[str, ...]
    # Character offset of answers[0] in context (verified on read); -1 when unknown (abstractive
    # answers such as Financial-QA-10k's, or a source without offsets whose answer is not a span).
    answer_start: int = -1

    def to_row(self) -> dict:
        row = asdict(self)
        row["answers"] = list(self.answers)
        return row


@dataclass(frozen=True)
class Turn:
    user: str
    assistant: str
    train: bool = True  # False: the assistant reply is context only (OpenAI `weight: 0`)


@dataclass(frozen=True)
class Conversation:
    id: str
    group: str  # split key: examples of one group never land in two splits
    system: str | None
    turns: tuple[Turn, ...]

    def messages(self, default_system: str | None = None) -> list[dict]:
        """Chat messages for a chat template: system (own, else the default), then the turns."""
        msgs = []
        system = self.system if self.system is not None else default_system
        if system is not None:
            msgs.append({"role": "system", "content": system})
        for t in self.turns:
            msgs += [{"role": "user", "content": t.user}, {"role": "assistant", "content": t.assistant}]
        return msgs


def qa_to_conversation(rec: QARecord, language: str, template: str | None = None,
                       context: str | None = None) -> Conversation:
    """The SFT example of a QA record: the prompt template over (context, question) -> answers[0].

    `context` replaces the record's own (a shortened or a retrieved passage)."""
    user = build_prompt(rec.context if context is None else context, rec.question, language, template)
    return Conversation(rec.id, rec.passage_id, None, (Turn(user, rec.answers[0]),))


def to_alpaca(conv: Conversation) -> dict:
    """Alpaca record: the last turn as instruction/output, earlier turns as `history`."""
    *earlier, last = conv.turns
    row = {"id": conv.id, "instruction": last.user, "input": "", "output": last.assistant,
           "history": [[t.user, t.assistant] for t in earlier]}
    if conv.system is not None:
        row["system"] = conv.system
    return row


def to_messages(conv: Conversation) -> dict:
    """OpenAI fine-tuning record `{"messages": [...]}`; untrained replies carry `weight: 0`."""
    msgs = []
    if conv.system is not None:
        msgs.append({"role": "system", "content": conv.system})
    for t in conv.turns:
        msgs.append({"role": "user", "content": t.user})
        reply = {"role": "assistant", "content": t.assistant}
        if not t.train:
            reply["weight"] = 0
        msgs.append(reply)
    return {"id": conv.id, "messages": msgs}


EXPORTERS = {"alpaca": to_alpaca, "messages": to_messages}
