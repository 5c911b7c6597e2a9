"""Prompt templates shared by data preparation, the RAG ingress and evaluation.

Training and serving must build the exact same prompt, so there is one definition of it here.
"""

from __future__ import annotations

from string import Formatter

TEMPLATES: dict[str, str] = {
    "zh": "请用下面的文段的原文来回答问题\n\n### 已知文段：{context}\n\n### 问题：{question}\n",
    "en": (
        "Please use the original text of the following paragraph to answer the question\n\n"
        "### Known paragraph: {context}\n\n### Question: {question}\n"
    ),
}


def build_prompt(context: str, question: str, language: str, template: str | None = None) -> str:
    """The user turn of an extractive-QA example (Alpaca `instruction`): `template` (with
    `{context}` and `{question}`), or the language's default."""
    return (template or TEMPLATES[language]).format(context=context, question=question)


def template_fields(template: str) -> set[str]:
    """The `{name}` fields of a template (to validate a user-given one)."""
    return {name for _, name, _, _ in Formatter().parse(template) if name is not None}


def join_contexts(contexts: list[str]) -> str:
    """How several retrieved passages become one `{context}`."""
    return "\n\n".join(c.strip() for c in contexts)


def rag_messages(contexts: list[str], question: str, language: str, system_prompt: str,
                 template: str | None = None) -> list[dict]:
    """The chat a RAG request becomes: served by the ingress, or sent to an external endpoint."""
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": build_prompt(join_contexts(contexts), question, language, template)}]
