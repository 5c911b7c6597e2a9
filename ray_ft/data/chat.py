"""Instruction data: Alpaca JSON/JSONL and OpenAI `messages` JSONL, read into `Conversation`s.

Alpaca: `{instruction, input?, output, system?, history?: [[user, assistant], ...]}`; the user
turn is `instruction` + newline + `input` (LLaMA-Factory's convention). Messages: `{"messages":
[{"role", "content", "weight"?}, ...]}`: an optional system message, then user/assistant turns
in alternation ending with an assistant reply; `weight: 0` on a reply keeps it as context only.
Both may carry an `id`; records without one are named by their position. Records are split by
`group`: the hash of the user turns, so copies of one prompt never straddle two splits.
"""

from __future__ import annotations

from collections.abc import Iterable

from ray_ft.data.records import Conversation, Turn, passage_id_of
from ray_ft.data.sources import Problems, RecordError, read_records


def _text(obj: dict, key: str, required: bool = True) -> str:
    value = obj.get(key, None if required else "")
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise RecordError(f"field '{key}' missing or empty" if required else f"field '{key}' is not a string")
    return value


def _record_id(obj: dict, where: str) -> str:
    rid = obj.get("id")
    return str(rid) if isinstance(rid, (str, int)) and str(rid) != "" else where.replace("line ", "L")


def _group(turns: list[Turn]) -> str:
    return passage_id_of("\0".join(t.user for t in turns))


def alpaca_conversation(obj: object, where: str) -> Conversation:
    if not isinstance(obj, dict):
        raise RecordError("expected an object")
    instruction, output = _text(obj, "instruction"), _text(obj, "output")
    extra = _text(obj, "input", required=False)
    system = obj.get("system")
    if system is not None and not isinstance(system, str):
        raise RecordError("field 'system' is not a string")
    history = obj.get("history") or []
    if not isinstance(history, list):
        raise RecordError("field 'history' must be a list of [user, assistant] pairs")
    turns = []
    for h, pair in enumerate(history):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(t, str) and t.strip() for t in pair)):
            raise RecordError(f"field 'history[{h}]' must be a [user, assistant] pair of non-empty strings")
        turns.append(Turn(pair[0], pair[1]))
    user = f"{instruction}\n{extra}" if extra.strip() else instruction
    turns.append(Turn(user, output))
    return Conversation(_record_id(obj, where), _group(turns), system or None, tuple(turns))


def messages_conversation(obj: object, where: str) -> Conversation:
    if not isinstance(obj, dict):
        raise RecordError("expected an object")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise RecordError("field 'messages' missing or empty")
    system = None
    for m, msg in enumerate(msgs):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str):
            raise RecordError(f"field 'messages[{m}].content' missing or not a string")
        if msg.get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"field 'messages[{m}].role': {msg.get('role')!r} is not system, user "
                              "or assistant")
    if msgs[0]["role"] == "system":
        system, msgs, offset = msgs[0]["content"], msgs[1:], 1
    else:
        offset = 0
    if len(msgs) < 2 or len(msgs) % 2:
        raise RecordError("field 'messages': expected user/assistant pairs ending with an assistant reply")
    turns = []
    for k in range(0, len(msgs), 2):
        user, reply = msgs[k], msgs[k + 1]
        if user["role"] != "user" or reply["role"] != "assistant":
            raise RecordError(f"field 'messages[{k + offset}]': expected a user message followed by an "
                              f"assistant reply, got {user['role']} then {reply['role']}")
        for m, msg in ((k, user), (k + 1, reply)):
            if not msg["content"].strip():
                raise RecordError(f"field 'messages[{m + offset}].content' is empty")
        weight = reply.get("weight", 1)
        if weight not in (0, 1):
            raise RecordError(f"field 'messages[{k + 1 + offset}].weight' must be 0 or 1")
        turns.append(Turn(user["content"], reply["content"], train=weight == 1))
    if not any(t.train for t in turns):
        raise RecordError("field 'messages': every assistant reply has weight 0; nothing to train on")
    return Conversation(_record_id(obj, where), _group(turns), system, tuple(turns))


PARSERS = {"alpaca": alpaca_conversation, "messages": messages_conversation}


def read_conversations(name: str, records: Iterable[tuple[str, object]], fmt: str,
                       problems: Problems) -> list[Conversation]:
    """Conversations of `records` ((position, object) pairs) in format `fmt`."""
    return read_records(name, records, PARSERS[fmt], problems, fmt)
