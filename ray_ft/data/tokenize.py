"""Chat-template tokenization with the prompt masked out of the loss."""

from __future__ import annotations

from dataclasses import dataclass

from ray_ft.errors import RayFTError

IGNORE_INDEX = -100


def chat_messages(system_prompt: str, user: str, assistant: str | None = None) -> list[dict]:
    """The conversation of one example; the system message replaces the template's built-in one."""
    msgs = [{"role": "system", "content": system_prompt}, {"role": "user", "content": user}]
    if assistant is not None:
        msgs.append({"role": "assistant", "content": assistant})
    return msgs


def render_prompt(tokenizer, system_prompt: str, user: str) -> str:
    """Prompt text up to and including the assistant header (what the server feeds the engine)."""
    if not getattr(tokenizer, "chat_template", None):
        raise RayFTError(f"tokenizer of '{tokenizer.name_or_path}' has no chat template")
    return tokenizer.apply_chat_template(
        chat_messages(system_prompt, user), tokenize=False, add_generation_prompt=True
    )


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def tokenize_example(tokenizer, system_prompt: str, user: str, answer: str) -> TokenizedExample:
    """Token ids of prompt + answer; labels are IGNORE_INDEX over the prompt.

    The answer's labels include the end-of-turn tokens the template appends, so the model learns
    to stop after the answer.
    """
    prompt = render_prompt(tokenizer, system_prompt, user)
    full = tokenizer.apply_chat_template(
        chat_messages(system_prompt, user, answer), tokenize=False, add_generation_prompt=False
    )
    if not full.startswith(prompt):
        raise RayFTError(f"chat template of '{tokenizer.name_or_path}' does not extend the prompt "
                         "with the answer; cannot mask the prompt")
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    if full_ids[: len(prompt_ids)] != prompt_ids:
        # A merge across the prompt/answer boundary: tokenize the answer part separately.
        full_ids = prompt_ids + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
    labels = [IGNORE_INDEX] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return TokenizedExample(full_ids, labels)
