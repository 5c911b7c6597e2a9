"""Prompt templates shared by data preparation, the RAG ingress and evaluation.

Training and serving must build the exact same prompt, so there is one definition of it here.
"""

from __future__ import annotations

TEMPLATES: dict[str, str] = {
    "zh": "请用下面的文段的原文来回答问题\n\n### 已知文段：{context}\n\n### 问题：{question}\n",
    "en": (
        "Please use the original text of the following paragraph to answer the question\n\n"
        "### Known paragraph: {context}\n\n### Question: {question}\n"
    ),
}


def build_prompt(context: str, question: str, language: str) -> str:
    """The user turn of an extractive-QA example (Alpaca `instruction`)."""
    return TEMPLATES[language].format(context=context, question=question)


def join_contexts(contexts: list[str]) -> str:
    """How several retrieved passages become one `{context}`."""
    return "\n\n".join(c.strip() for c in contexts)


def rag_messages(contexts: list[str], question: str, language: str, system_prompt: str) -> list[dict]:
    """The chat a RAG request becomes: served by the ingress, or sent to an external endpoint."""
    return [{"role": "system", "content": system_prompt},
            {"role": "user", "content": build_prompt(join_contexts(contexts), question, language)}]
