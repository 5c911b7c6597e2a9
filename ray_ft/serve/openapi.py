"""The ingress's published OpenAPI schema (`/openapi.json`), made to say what the server does.

FastAPI alone documents a 422 body the server never sends (refusals are 400s in the OpenAI error
shape), no other error, no body for the answers the ingress renders itself (chat, embeddings,
models), no auth, and none of the deployment's limits. Here every route lists the statuses it
answers with their bodies, bearer auth is declared where it is on (and `/healthz` open), and the
configured limits (max_tokens, texts per request) are the schema's bounds, so a client or a
fuzzer reading the schema knows what is accepted.
"""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

# -- bodies the ingress renders itself (documentation; not used to serialise) ---------------------


# 400s that a request valid by this schema may still get, because what they check cannot be
# written in JSON Schema: each error carries its code, so a client (or a fuzzer) can tell them
# from a schema the server does not keep.
LIMIT_CODES = {
    "context_length_exceeded": "the prompt's tokens plus max_tokens exceed the model's context",
    "input_too_long": "the texts together exceed serve.max_input_chars",
    "invalid_response_format": "the JSON schema of response_format cannot be compiled into a constraint",
    "invalid_messages": "the model's chat template refuses the messages (e.g. their order of roles)",
    "rerank_unavailable": "rerank was asked for and the deployment has no reranker",
    "adapter_rejected": "the adapter's location is not allowed or holds no LoRA adapter that fits the base",
}


class ErrorDetail(BaseModel):
    message: str
    type: str
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Health(BaseModel):
    status: Literal["ok"]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    finish_reason: str | None
    message: AssistantMessage


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Embedding(BaseModel):
    object: Literal["embedding"]
    index: int
    embedding: list[float] | str  # str: base64 little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"]
    model: str
    data: list[Embedding]
    usage: EmbeddingUsage


class DeletedAdapter(BaseModel):
    id: str
    object: Literal["model"]
    deleted: Literal[True]


# -- statuses per route -------------------------------------------------------------------------
_WHY = {400: "The request is malformed or over a limit; a valid one only with a `code`: "
        + "; ".join(f"{c} ({why})" for c, why in LIMIT_CODES.items()) + ".", 401: "Missing or wrong bearer token.",
        403: "Writes need bearer auth on the deployment.", 404: "Unknown model, document or adapter, "
        "or the feature is off.", 409: "The name is taken by the job's own config.",
        413: "The body exceeds serve.max_request_bytes.", 503: "An upstream replica is unavailable.",
        504: "An upstream call passed serve.request_timeout_s."}
_ALWAYS = (400, 401, 413, 503, 504)  # every route but /healthz: body check, auth, upstream


def documented(answer: type[BaseModel] | None, *errors: int, stream: bool = False) -> dict:
    """FastAPI `responses=` for a route: the 200 body (`answer`; with `stream`, server-sent events
    too) and the error statuses it may answer, beyond those of every route."""
    out: dict = {}
    if answer is not None:
        out[200] = {"model": answer}
        if stream:
            out[200]["content"] = {"text/event-stream": {"schema": {"type": "string"}}}
    for status in sorted({*_ALWAYS, *errors}):
        out[status] = {"model": ErrorResponse, "description": _WHY[status]}
    return out


def publish_truthful_schema(api: FastAPI, *, auth: bool, max_tokens: int, max_texts: int,
                            max_rerank_documents: int) -> None:
    """Replace `api.openapi` with the generated schema, corrected: FastAPI's 422 removed, bearer
    auth declared when `auth` (not on the open `/healthz`), the deployment's limits as bounds."""

    def openapi() -> dict:
        if api.openapi_schema is None:
            spec = get_openapi(title=api.title, version=api.version, routes=api.routes)
            for path, operations in spec["paths"].items():
                for op in operations.values():
                    op["responses"].pop("422", None)
                    if auth and path != "/healthz":
                        op["security"] = [{"bearer": []}]
            schemas = spec.get("components", {}).get("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                schemas.pop(unused, None)
            if auth:
                spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            _bound(schemas, ("ChatCompletionRequest", "RAGRequest"), ("max_tokens", "max_completion_tokens"),
                   "integer", maximum=max_tokens)
            _bound(schemas, ("EmbeddingRequest", "DocumentsRequest"), ("input", "documents"), "array",
                   minItems=1, maxItems=max_texts)
            _bound(schemas, ("RerankRequest",), ("documents",), "array", minItems=1, maxItems=max_rerank_documents)
            _bound(schemas, ("ChatCompletionRequest",), ("stop",), "array", maxItems=4)
            api.openapi_schema = spec
        return api.openapi_schema

    api.openapi = openapi


def _bound(schemas: dict, models: tuple[str, ...], fields: tuple[str, ...], kind: str, **bounds: int) -> None:
    """Set `bounds` (maximum, minItems, maxItems) on the `kind` branch of each field."""
    for model in models:
        props = schemas.get(model, {}).get("properties", {})
        for field in fields:
            if field in props:
                for branch in props[field].get("anyOf", [props[field]]):
                    if branch.get("type") == kind:
                        branch.update(bounds)
