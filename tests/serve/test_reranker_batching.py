"""The reranker deployment's `@serve.batch` with a real MiniLM cross-encoder, called in-process
(the deployment class itself, no cluster): concurrent requests share one model call and each
gets exactly its own scores."""

import asyncio

import numpy as np
import pytest

REQUESTS = [("how tall is everest", ["Everest is 8,849 m tall.", "The Nile is long."]),
            ("apple revenue", ["Apple sold 383 billion dollars of goods and services in fiscal 2023."]),
            ("rivers", ["The Nile flows north.", "Mount Everest", "Rain falls in spring on the hills."])]


@pytest.mark.slow
def test_concurrent_rerank_requests_are_batched_and_get_their_own_scores(minilm_dir, tmp_path, monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    from ray_ft.reranker import CrossEncoderReranker, load_cross_encoder
    from ray_ft.serve.app import RerankerDeployment

    for part in load_cross_encoder(str(minilm_dir), seed=1):
        part.save_pretrained(tmp_path)
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    dep = RerankerDeployment.func_or_class(str(tmp_path), threads=2, max_batch_size=8, batch_wait_timeout_s=0.05)
    reference = CrossEncoderReranker(str(tmp_path))

    async def fire():
        return await asyncio.gather(*(dep.rerank(q, p) for q, p in REQUESTS))

    got = asyncio.run(fire())
    stats = dep.batch_stats()
    assert {k: stats[k] for k in ("model_calls", "requests", "pairs")} == {"model_calls": 1, "requests": 3, "pairs": 6}
    for (query, passages), scores in zip(REQUESTS, got):
        # padded to the batch's longest pair, each pair still scores as alone (attention mask)
        np.testing.assert_allclose(scores, reference.scores(query, passages), atol=1e-5)
