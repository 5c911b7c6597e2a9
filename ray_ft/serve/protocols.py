"""Small protocols the stages talk through, so each engine can be swapped and tested alone."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True)
class Completion:
    text: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


@dataclass(frozen=True)
class Hit:
    node_id: str
    text: str
    score: float
    metadata: dict = field(default_factory=dict)


@runtime_checkable
class Generator(Protocol):
    def model_names(self) -> list[str]: ...

    async def generate(
        self, messages: list[dict], model: str, max_tokens: int, temperature: float,
        structured: dict | None = None, sampling: dict | None = None,
    ) -> Completion: ...


@runtime_checkable
class Embedder(Protocol):
    def embed(self, texts: list[str]) -> np.ndarray:
        """L2-normalised float32 vectors, one row per text."""
        ...


@runtime_checkable
class Retriever(Protocol):
    def retrieve(self, query: str, top_k: int) -> list[Hit]: ...
