"""QA metrics as the seed recipe defines them; pure functions on strings and vectors."""

from __future__ import annotations

import numpy as np


def exact_match(prediction: str, references: list[str]) -> float:
    """1.0 when the stripped prediction equals the stripped first reference answer."""
    if not references:
        raise ValueError("exact_match needs at least one reference answer")
    return float(prediction.strip() == references[0].strip())


def origin_score(answer: str, context: str) -> float:
    """1.0 when every whitespace-separated word of the answer occurs in the context.

    An empty answer scores 0: it quotes nothing. (Chinese has no spaces, so for Chinese this is a
    substring test of each space-free run.)
    """
    words = answer.split()
    return float(bool(words) and all(w in context for w in words))


def clipped_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two matrices, clipped to [0, 1]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.clip(cos, 0.0, 1.0)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")
