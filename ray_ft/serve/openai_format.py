"""OpenAI wire format of chat completions: the whole answer, and streamed chunks as server-sent
events (`data: {chunk}` lines, then `data: [DONE]`), as the official clients parse them."""

from __future__ import annotations

import json
import time
import uuid

from ray_ft.serve.protocols import Completion

SSE_DONE = "data: [DONE]\n\n"


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(out: Completion) -> dict:
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
            "total_tokens": out.prompt_tokens + out.completion_tokens}


def completion_body(out: Completion) -> dict:
    return {
        "id": completion_id(), "object": "chat.completion", "created": int(time.time()),
        "model": out.model,
        "choices": [{"index": 0, "finish_reason": out.finish_reason,
                     "message": {"role": "assistant", "content": out.text}}],
        "usage": usage(out),
    }


class ChunkWriter:
    """The chunks of one streamed answer; every chunk carries the same id, time and model."""

    def __init__(self, model: str):
        self.head = {"id": completion_id(), "object": "chat.completion.chunk",
                     "created": int(time.time()), "model": model}

    def event(self, delta: dict, finish_reason: str | None = None) -> str:
        return sse({**self.head, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]})

    def usage_event(self, last: Completion) -> str:
        """With `stream_options.include_usage`: a last chunk without choices, with the usage."""
        return sse({**self.head, "choices": [], "usage": usage(last)})


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_body(message: str, kind: str, code: str | None = None) -> dict:
    """OpenAI's error object; `code` names refusals a schema cannot foresee (LIMIT_CODES)."""
    return {"error": {"message": message, "type": kind, **({"code": code} if code else {})}}
