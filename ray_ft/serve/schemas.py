"""Request/response bodies of the HTTP API (OpenAI-compatible where OpenAI has the endpoint)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use

    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False


class EmbeddingRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: str | list[str]
    model: str | None = None


class RAGRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str = Field(..., min_length=1)
    model: str | None = Field(None, description="Base model or adapter name; default: the base.")
    top_k: int | None = Field(None, ge=1, le=20)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    contexts: list[str] | None = Field(
        None, description="Use these passages instead of retrieving (the gold-context control)."
    )


class RetrievedContext(BaseModel):
    node_id: str | None
    text: str
    score: float | None


class RAGResponse(BaseModel):
    answer: str
    model: str
    contexts: list[RetrievedContext]
    retrieval_latency_s: float
    generation_latency_s: float
    prompt_tokens: int
    completion_tokens: int
