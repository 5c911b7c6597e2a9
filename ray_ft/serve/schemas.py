"""Request/response bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint).

Requests are parsed strictly (no 0 for false, no "1" for 1): what the published schema says a
field holds is what is accepted.
"""

from __future__ import annotations

import functools
from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ray_ft.paths import SAFE_NAME_REGEX


@functools.cache
def _int_fields(model: type[BaseModel]) -> frozenset[str]:
    """The integer fields of a request model (once per model, not per request)."""
    return frozenset(n for n, f in model.model_fields.items() if f.annotation is int or int in get_args(f.annotation))


class _Request(BaseModel):
    model_config = ConfigDict(strict=True)

    @model_validator(mode="before")
    @classmethod
    def _integral_floats(cls, data):
        """JSON Schema's integer admits 2.0, which strict parsing alone would refuse."""
        if not isinstance(data, dict):
            return data
        ints = _int_fields(cls)
        return {k: int(v) if k in ints and isinstance(v, float) and v.is_integer() else v for k, v in data.items()}


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant"]
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content):
        """OpenAI's list of content parts: the text parts, joined; other kinds are not served."""
        if not isinstance(content, list):
            return content
        kinds = sorted({p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content} - {"text"})
        if kinds:
            raise ValueError(f"only text content parts are served, got {kinds}")
        return "\n".join(str(p.get("text", "")) for p in content)


class JSONSchemaFormat(_Request):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "reply"
    json_schema: dict = Field(..., alias="schema")


class TextFormat(_Request):
    type: Literal["text"]

    def structured(self) -> dict | None:
        return None


# Whitespace between JSON tokens is disallowed: it means nothing to a JSON reader, and a small
# model let free to emit it can fill `max_tokens` with newlines before the closing brace
# (measured: most of SmolLM2-135M's judge replies were cut that way).
class JSONObjectFormat(_Request):
    type: Literal["json_object"]

    def structured(self) -> dict | None:
        return {"json_object": True, "disable_any_whitespace": True}


class JSONSchemaResponseFormat(_Request):
    type: Literal["json_schema"]
    json_schema: JSONSchemaFormat

    def structured(self) -> dict | None:
        return {"json": self.json_schema.json_schema, "disable_any_whitespace": True}


# OpenAI `response_format`: free text, any JSON object, or JSON following a schema; `structured()`
# is the engine's decoding constraint (None for free text).
ResponseFormat = Annotated[TextFormat | JSONObjectFormat | JSONSchemaResponseFormat, Field(discriminator="type")]


class StreamOptions(_Request):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = Field(False, description="Send the token usage in a last chunk.")


class ChatCompletionRequest(_Request):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer max_tokens; wins when both are set.")
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = Field(None, description="Up to 4 strings that end the answer (not included).")
    seed: int | None = Field(None, description="Seed of this request's sampling.")
    n: int = Field(1, ge=1, le=1, description="Choices per request: one is served.")
    stream: bool = Field(False, description="Answer as server-sent events, one chunk per new text.")
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):  # here, not as max_length: a union's error would name its first branch
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop strings, got {len(stop)}")
        return stop

    def sampling(self) -> dict:
        """The sampling settings beyond temperature that differ from vLLM's defaults."""
        out = {"top_p": self.top_p} if self.top_p != 1.0 else {}
        if self.stop:
            out["stop"] = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if self.seed is not None:
            out["seed"] = self.seed
        return out


class EmbeddingRequest(_Request):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = Field(
        "float", description="base64: little-endian float32 bytes, as OpenAI (4x smaller, no JSON floats)."
    )


class RAGRequest(_Request):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1)
    model: str | None = Field(None, description="Base model or adapter name; default: the base.")
    top_k: int | None = Field(None, ge=1, le=20)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    contexts: list[str] | None = Field(
        None, min_length=1, description="Use these passages instead of retrieving (the gold-context control)."
    )
    rerank: bool | None = Field(
        None, description="Rerank the retrieved passages (default: when the deployment has a reranker).")


class RetrievedContext(BaseModel):
    node_id: str | None
    text: str
    score: float | None = Field(None, description="The score this list is ordered by (the reranker's when it ran).")
    retrieval_score: float | None = Field(None, description="The first stage's score (cosine, BM25 or fused).")
    retrieval_rank: int | None = Field(None, description="0-based rank in the first stage's list.")
    rerank_score: float | None = Field(None, description="The cross-encoder's relevance in (0, 1), with rerank.")


class RAGResponse(BaseModel):
    answer: str
    model: str
    contexts: list[RetrievedContext]
    retrieval_latency_s: float
    generation_latency_s: float
    prompt_tokens: int
    completion_tokens: int


class RetrieveRequest(_Request):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1)
    top_k: int | None = Field(None, ge=1, le=20)
    rerank: bool | None = Field(
        None, description="Rerank the retrieved passages (default: when the deployment has a reranker).")


class RetrieveResponse(BaseModel):
    contexts: list[RetrievedContext]
    latency_s: float


class RerankDocument(BaseModel):
    text: str


class RerankRequest(_Request):
    """The common rerank request (Cohere, Jina, vLLM): a query and the documents to order."""

    model_config = ConfigDict(extra="ignore")

    query: str = Field(..., min_length=1)
    documents: list[str | RerankDocument] = Field(
        ..., description="Texts to score against the query (at least one): strings, or objects with a "
        "`text` field (as Cohere v2 / Jina accept)."
    )
    top_n: int | None = Field(None, ge=1, description="Return the best n (default: all).")
    model: str | None = Field(None, description="Ignored: the deployment serves one reranker.")
    return_documents: bool = Field(True, description="Echo each result's text.")

    @property
    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]




class RerankResult(BaseModel):
    index: int = Field(..., description="Position of the document in the request.")
    relevance_score: float = Field(..., description="In (0, 1); results are ordered by it, best first.")
    document: RerankDocument | None = None


class RerankResponse(BaseModel):
    id: str
    model: str
    results: list[RerankResult]


class DocumentIn(_Request):
    model_config = ConfigDict(extra="forbid")

    id: str = Field(..., min_length=1, max_length=256,
                    description="Document id; a document already in the knowledge base is replaced.")
    text: str = Field(..., min_length=1, description="The document's text, cut into nodes by the served node group.")
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict)


class DocumentsRequest(_Request):
    model_config = ConfigDict(extra="forbid")

    documents: list[DocumentIn] = Field(
        ..., min_length=1, description="Documents to add; a repeated id is one document, the last "
        "one given (as a later request replaces an earlier one)."
    )

    @field_validator("documents")
    @classmethod
    def _last_of_each_id(cls, documents):
        last = {d.id: d for d in documents}  # keeps the first position, the last value
        return list(last.values())


class DocumentsResponse(BaseModel):
    documents: int = Field(..., description="Documents added or replaced.")
    nodes: int = Field(..., description="Nodes written (embedded) for them.")
    removed_nodes: int = Field(..., description="Nodes of replaced documents that their new text no longer has.")
    version: int = Field(..., description="Knowledge-base table version that holds them.")


class DeletedDocument(BaseModel):
    id: str
    deleted_nodes: int
    version: int


class AdapterRequest(_Request):
    model_config = ConfigDict(extra="forbid")

    # The pattern is published; the check is ray_ft.paths' own, whose message says what is wrong.
    name: str = Field(..., min_length=1, max_length=128, json_schema_extra={"pattern": SAFE_NAME_REGEX},
                      description="Served name (the `model` of requests).")
    location: str = Field(..., min_length=1, max_length=4096,
                          description="Adapter folder under an allowed root, or an allowed object-storage URI.")


class AdapterResponse(BaseModel):
    id: str
    object: str = "model"
    location: str
