"""Chat-template tokenization with everything but the trained assistant replies masked out.

A conversation is tokenized turn by turn: for each assistant reply the template is rendered up to
the reply's header (`add_generation_prompt=True`) and through the reply; the text between the two
renderings is the reply plus the template's end-of-turn tokens, which are trained so the model
learns to stop. The rest (system, user turns, headers, replies marked `train=False`) gets
IGNORE_INDEX. The first prompt is tokenized exactly as the server tokenizes it.
"""

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


def trained_positions(labels):
    """Sequence positions t whose next token t+1 is a label in any row (`labels` [batch, len]):
    where a causal LM's logits are needed to train on, or to score, the labels."""
    shifted = labels[:, 1:] != IGNORE_INDEX
    return shifted.any(dim=0).nonzero().squeeze(1)


def check_chat_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise RayFTError(f"tokenizer of '{tokenizer.name_or_path}' has no chat template; use an "
                         "instruct/chat model (its tokenizer_config.json must define chat_template)")


def render_prompt(tokenizer, system_prompt: str, user: str) -> str:
    """Prompt text up to and including the assistant header (what the server feeds the engine)."""
    check_chat_template(tokenizer)
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


def tokenize_conversation(tokenizer, messages: list[dict], train: list[bool] | None = None) -> TokenizedExample:
    """Token ids of a whole conversation; labels are the tokens of the assistant replies whose
    `train` flag is set (default: all), IGNORE_INDEX elsewhere."""
    check_chat_template(tokenizer)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    train = [True] * len(replies) if train is None else train
    ids: list[int] = []
    labels: list[int] = []
    done = ""
    for r, i in enumerate(replies):
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False, add_generation_prompt=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise RayFTError(f"chat template of '{tokenizer.name_or_path}' does not render turn {r + 1} "
                             "as an extension of the turns before it; cannot mask the prompt")
        prompt_ids = tokenizer(prompt[len(done):], add_special_tokens=False)["input_ids"]
        reply_ids = tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids += prompt_ids + reply_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + (reply_ids if train[r] else [IGNORE_INDEX] * len(reply_ids))
        done = full
    return TokenizedExample(ids, labels)


def tokenize_example(tokenizer, system_prompt: str, user: str, answer: str) -> TokenizedExample:
    """One user turn and its answer (the QA case)."""
    return tokenize_conversation(tokenizer, chat_messages(system_prompt, user, answer))
