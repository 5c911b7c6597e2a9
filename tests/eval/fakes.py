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


def eval_rows(n_questions: int, seed: int = 0) -> list[dict]:
    """Predictions rows as `run_eval` writes them: base and finetuned, gold and retrieved mode (top 3),
    4 questions per passage; each model answers the reference span, or a wrong one, at random."""
    rng = np.random.default_rng(seed)
    words = ["river", "harbor", "treaty", "engine", "garden", "signal", "market", "castle", "valley", "comet"]
    passages = [" ".join(rng.choice(words, 120)) + f" The answer token is ans{p}x." for p in range((n_questions + 3) // 4)]
    rows = []
    for mode in ("gold", "retrieved"):
        for model, p_right in (("base", 0.3), ("finetuned", 0.7)):
            for q in range(n_questions):
                pid = f"p{q // 4}"
                passage, ref = passages[q // 4], f"ans{q // 4}x"
                right = bool(rng.random() < p_right)
                row = {"id": f"q{q:05d}", "model": model, "served_model": model, "mode": mode,
                       "question": f"Which token does passage {q // 4} give (question {q})?", "references": [ref],
                       "prediction": ref if right else str(rng.choice(words)), "gold_passage_id": pid,
                       "latency_s": float(rng.uniform(0.1, 1.0)), "completion_tokens": 4,
                       "em": float(right), "cmrc_em": float(right), "cmrc_f1": 1.0 if right else float(rng.uniform(0, 0.4)),
                       "cosine": float(rng.uniform(0.5, 1.0)), "origin": 1.0, "origin_char": 1.0}
                if mode == "gold":
                    row.update(context=passage, retrieved_ids=[])
                else:
                    others = [(q // 4 + k) % len(passages) for k in (1, 2)]
                    order = [q // 4, *others] if q % 3 else [*others, q // 4]
                    row.update(retrieved_texts=[passages[i] for i in order], retrieved_scores=[3.0, 2.0, 1.0],
                               retrieved_ids=[f"p{i}" for i in order], gold_context=passage,
                               context="\n\n".join(passages[i] for i in order), context_hit=1.0,
                               recall_at_k=1.0, mrr_at_k=1.0 / (1 + order.index(q // 4)))
                rows.append(row)
    return rows
