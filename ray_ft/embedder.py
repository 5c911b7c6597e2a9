"""The sentence-transformers embedder: one class for every layer that embeds (the knowledge
base on Ray Data, embedder training's validation, the served Embedder deployment)."""

from __future__ import annotations

import numpy as np


class SentenceTransformerEmbedder:
    """Embeds with a sentence-transformers folder (pooling and normalisation from its modules)."""

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 64, dtype: str = "float32"):
        import torch
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(model_dir, device=device,
                                         model_kwargs={"torch_dtype": getattr(torch, dtype)})
        self.batch_size = batch_size

    def embed(self, texts: list[str]) -> np.ndarray:
        vecs = self.model.encode(list(texts), batch_size=self.batch_size, normalize_embeddings=True,
                                 convert_to_tensor=True, show_progress_bar=False)
        return vecs.float().cpu().numpy()  # numpy has no bfloat16
