"""Deterministic stand-ins for the engines, for unit tests of the eval logic."""

import numpy as np


class CharCountEmbedder:
    """Deterministic test embedder: counts of each character code modulo 8; records its calls."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(list(texts))
        out = np.zeros((len(texts), 8))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 8] += 1
        return out
