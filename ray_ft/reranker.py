"""The cross-encoder reranker: one class for every layer that scores (query, passage) pairs (the
reranker recipe's validation, the rerank stage's evaluation, the served Reranker deployment).

A cross-encoder reads the query and the passage together ("[CLS] query [SEP] passage [SEP]")
and gives one logit; it is a Hugging Face sequence-classification folder with one label, so what
ray_ft trains loads in sentence-transformers' `CrossEncoder` and FlagEmbedding's `FlagReranker`,
and theirs load here. A plain encoder (all-MiniLM-L6-v2) gets a fresh head, seeded.
"""

from __future__ import annotations

import numpy as np


def load_cross_encoder(model_dir: str, seed: int = 0, dtype=None):
    """(model, tokenizer) of a one-logit sequence classifier. A folder without such a head gets
    a new linear head, initialised under `seed` (the same head on every worker and rerun)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    config = AutoConfig.from_pretrained(model_dir)
    has_head = bool(getattr(config, "architectures", None)) and any(
        a.endswith("ForSequenceClassification") for a in config.architectures) and config.num_labels == 1
    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    if not has_head:  # the "newly initialized weights" warning is the point here, not news
        hf_logging.set_verbosity_error()
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=1, **({"dtype": dtype} if dtype is not None else {}))
    finally:
        hf_logging.set_verbosity(verbosity)
    return model, AutoTokenizer.from_pretrained(model_dir)


def encode_pairs(tok, queries: list[str], passages: list[str], max_len: int) -> dict:
    """Tokenized (query, passage) pairs, right-padded; the passage is cut first."""
    return tok(list(queries), list(passages), padding=True, truncation="only_second", max_length=max_len,
               return_tensors="pt")


def pair_logits(model, tok, queries: list[str], passages: list[str], max_len: int, device="cpu",
                batch_size: int = 32) -> np.ndarray:
    """The model's logit for each (queries[i], passages[i]), without gradients, in batches."""
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(queries), batch_size):
            enc = encode_pairs(tok, queries[i:i + batch_size], passages[i:i + batch_size], max_len)
            logits = model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.append(logits.float().reshape(-1).cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def relevance(logits: np.ndarray) -> np.ndarray:
    """Logits as relevance scores in (0, 1) (sigmoid; the order is the logits' order), as
    FlagReranker's normalize=True and the common /v1/rerank APIs report them."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))


class CrossEncoderReranker:
    """Scores passages against a query with a cross-encoder folder."""

    def __init__(self, model_dir: str, device: str = "cpu", batch_size: int = 32, max_len: int = 512,
                 dtype: str = "float32"):
        import torch

        self.model, self.tok = load_cross_encoder(model_dir, dtype=getattr(torch, dtype))
        self.model.to(device).eval()
        self.device, self.batch_size, self.max_len = device, batch_size, max_len

    def logits(self, queries: list[str], passages: list[str]) -> np.ndarray:
        return pair_logits(self.model, self.tok, queries, passages, self.max_len, self.device, self.batch_size)

    def scores(self, query: str, passages: list[str]) -> np.ndarray:
        """Relevance of each passage to `query`, in (0, 1)."""
        return relevance(self.logits([query] * len(passages), list(passages)))
