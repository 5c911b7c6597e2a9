"""How a RAG request (query + passages) becomes a chat for the generator.

By default it is the training prompt (`ray_ft.data.templates.rag_messages`), byte for byte: a
model fine-tuned on that prompt must be served with it. A deployment may set its own user-turn
template with `{context_str}` and `{query}` (`serve.prompt_template`) and its own system prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_ft.data.templates import join_contexts, rag_messages


@dataclass(frozen=True)
class RAGPrompt:
    language: str
    system_prompt: str
    template: str | None = None  # serving's own ({context_str}, {query}); None: the training prompt
    training_template: str | None = None  # data.prompt_template ({context}, {question}), if set

    def messages(self, contexts: list[str], query: str) -> list[dict]:
        if self.template is None:
            if self.training_template is not None:  # the training code path, so bytes match
                return rag_messages(contexts, query, self.language, self.system_prompt, self.training_template)
            return rag_messages(contexts, query, self.language, self.system_prompt)
        # str.format, as the training template: only the template's braces are fields, so
        # passages and queries may contain any text.
        user = self.template.format(context_str=join_contexts(contexts), query=query)
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]


def rag_prompt_of(cfg) -> RAGPrompt:
    """The prompt a job's graph serves (`cfg`: a JobConfig)."""
    s = cfg.serve
    return RAGPrompt(cfg.data.language, s.system_prompt or cfg.model.system_prompt, s.prompt_template,
                     cfg.data.prompt_template)
