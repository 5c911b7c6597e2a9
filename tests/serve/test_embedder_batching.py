"""The embedder deployment's `@serve.batch` with the real MiniLM, called in-process (the
deployment class itself, no cluster): concurrent requests share model calls and each gets
exactly its own vectors."""

import asyncio

import numpy as np
import pytest

from ray_ft.serve.app import EmbedderDeployment
from ray_ft.embedder import SentenceTransformerEmbedder

REQUESTS = [["a cat on a mat"], ["stock prices fell", "the river floods"], ["mount everest"],
            ["quarterly revenue"], ["a kitten sleeps", "rain in spring", "bond yields"], ["tea"]]

N_TEXTS = sum(len(r) for r in REQUESTS)


async def _fire(dep, requests):
    return await asyncio.gather(*(dep.embed(r) for r in requests))


@pytest.mark.slow
def test_concurrent_requests_are_batched_and_get_their_own_vectors(minilm_dir, monkeypatch):
    from types import SimpleNamespace

    from ray import serve

    # @serve.batch reads the replica's max_ongoing_requests (to warn about batches that can never
    # fill); outside a replica there is none, so give it the deployment's default.
    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=64))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    dep = EmbedderDeployment.func_or_class(str(minilm_dir), threads=2)
    assert dep.batch_stats()["model_s"] == 0.0
    reference = SentenceTransformerEmbedder(str(minilm_dir))

    async def run(max_batch_size, wait_s):
        dep.reconfigure({"max_batch_size": max_batch_size, "batch_wait_timeout_s": wait_s})
        before = dep.batch_stats()
        out = await _fire(dep, REQUESTS)
        after = dep.batch_stats()
        return out, {k: after[k] - before[k] for k in after if k != "model_s"}

    async def settings():  # one event loop: the batch queue lives on the loop that created it
        return [await run(8, 0.05), await run(4, 0.05), await run(1, 0.0)]

    (batched, stats), (capped, capped_stats), (unbatched, unbatched_stats) = asyncio.run(settings())
    assert stats == {"model_calls": 1, "requests": 6, "texts": N_TEXTS}  # all six arrived within the wait
    for texts, vecs in zip(REQUESTS, batched):
        assert vecs.shape == (len(texts), 384)
        # Padding to the batch's longest text does not change a text's vector (attention mask).
        np.testing.assert_allclose(vecs, reference.embed(texts), atol=1e-5)
    assert capped_stats["model_calls"] == 2 and capped_stats["requests"] == 6  # at most 4 per call
    assert unbatched_stats == {"model_calls": 6, "requests": 6, "texts": N_TEXTS}
    for a, b, c in zip(batched, capped, unbatched):
        np.testing.assert_allclose(a, b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5)
