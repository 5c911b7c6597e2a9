"""BM25, reciprocal-rank fusion, the persisted dense index, and the retriever deployment's modes
(called in-process with a fake embedder handle: no cluster)."""

import asyncio
import math

import numpy as np
import pytest

from ray_ft.config import RetrievalSettings, parse_job
from ray_ft.errors import RayFTError
from ray_ft.serve.retriever import RetrieverDeployment
from ray_ft.serve.protocols import Hit
from ray_ft.serve.retrieval import (
    BM25Index, lexical_tokens, load_index, nodes_fingerprint, reciprocal_rank_fusion, save_index,
)
from tests.serve.fakes import FakeHandle

DOCS = [{"passage_id": "cat", "text": "The cat sat on the mat. Cats like mats."},
        {"passage_id": "dog", "text": "A dog barked at the mailman."},
        {"passage_id": "zh", "text": "北京是中国的首都。"},
        {"passage_id": "fin", "text": "Revenue grew 12% in fiscal 2023."}]


def test_lexical_tokens_words_and_cjk_bigrams():
    assert lexical_tokens("The Cat's mat, 2023!") == ["the", "cat", "s", "mat", "2023"]
    assert lexical_tokens("北京首都") == ["北", "京", "首", "都", "北京", "京首", "首都"]
    assert lexical_tokens("GDP在北京") == ["gdp", "在", "北", "京", "在北", "北京"]


def test_bm25_scores_and_ranking():
    nodes = [{"node_id": d["passage_id"], "text": d["text"]} for d in DOCS]
    bm25 = BM25Index(nodes, k1=1.5, b=0.75)
    hits = bm25.search("cat on mat", top_k=4)
    assert [h.node_id for h in hits] == ["cat"]  # nodes sharing no term are not returned
    # By hand: "cat" and "on" and "mat" occur once in "cat" (9 tokens), df = 1 of N = 4.
    idf = math.log(1 + (4 - 1 + 0.5) / (1 + 0.5))
    lengths = [9, 6, 15, 6]  # "北京是中国的首都" = 8 characters + 7 bigrams
    norm = 1.5 * (1 - 0.75 + 0.75 * 9 / np.mean(lengths))
    assert hits[0].score == pytest.approx(3 * idf * 1 * 2.5 / (1 + norm))
    assert bm25.search("中国的首都在哪里", 2)[0].node_id == "zh"
    assert bm25.search("fiscal revenue", 2)[0].node_id == "fin"


def test_reciprocal_rank_fusion():
    a = [Hit("x", "X", 0.9), Hit("y", "Y", 0.8), Hit("z", "Z", 0.1)]
    b = [Hit("y", "Y", 12.0), Hit("w", "W", 3.0)]
    fused = reciprocal_rank_fusion([a, b], top_k=3, k=60)
    assert [h.node_id for h in fused] == ["y", "x", "w"]
    assert fused[0].score == pytest.approx(1 / 62 + 1 / 61) and fused[1].score == pytest.approx(1 / 61)


def test_index_round_trip_and_fingerprint(tmp_path):
    nodes = [{"node_id": "a", "text": "one"}, {"node_id": "b", "text": "two"}]
    fp = nodes_fingerprint(nodes, "emb@1")
    vecs = np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)
    save_index(tmp_path, fp, vecs)
    np.testing.assert_array_equal(load_index(tmp_path, fp), vecs)
    assert load_index(tmp_path, nodes_fingerprint(nodes, "emb@2")) is None  # other embedder
    assert load_index(tmp_path, nodes_fingerprint([*nodes, {"node_id": "c", "text": "x"}], "emb@1")) is None
    assert load_index(tmp_path / "absent", fp) is None
    (tmp_path / "vectors.npy").write_bytes(b"garbage")
    assert load_index(tmp_path, fp) is None


class CountingEmbedder:
    """Vectors from letter counts (so similar words are close); counts the texts it embedded."""

    def __init__(self):
        self.texts = 0

    async def embed(self, texts):
        self.texts += len(texts)
        out = np.zeros((len(texts), 26), dtype=np.float32)
        for i, t in enumerate(texts):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def _retriever(emb, mode="dense", index_dir=None, docs=DOCS, embedder_id="e1"):
    return RetrieverDeployment.func_or_class(
        docs, "passage", FakeHandle(emb), 30.0, 1, RetrievalSettings(mode=mode, candidates=4).model_dump(),
        str(index_dir) if index_dir else None, embedder_id)


def test_retriever_persists_its_index_and_reloads_it_only_when_unchanged(tmp_path):
    async def run():
        emb = CountingEmbedder()
        first = await _retriever(emb, index_dir=tmp_path).ready()
        assert first == {"nodes": 4, "mode": "dense", "index": "built"} and emb.texts == 4
        again = _retriever(emb, index_dir=tmp_path)
        assert (await again.ready())["index"] == "loaded" and emb.texts == 4  # nothing re-embedded
        hits = await again.retrieve("dogs bark", 1)
        assert hits[0].node_id == "dog" and emb.texts == 5  # only the query
        other_model = _retriever(emb, index_dir=tmp_path, embedder_id="e2")
        assert (await other_model.ready())["index"] == "built" and emb.texts == 9
        more_docs = _retriever(emb, index_dir=tmp_path, docs=[*DOCS, {"passage_id": "n", "text": "new"}])
        assert (await more_docs.ready())["index"] == "built" and emb.texts == 14

    asyncio.run(run())


class SlowEmbedder(CountingEmbedder):
    """Takes `delay_s` per call; fails its first `failures` calls."""

    def __init__(self, delay_s: float, failures: int = 0):
        super().__init__()
        self.delay_s, self.failures, self.calls = delay_s, failures, 0

    async def embed(self, texts):
        self.calls += 1
        await asyncio.sleep(self.delay_s)
        if self.failures:
            self.failures -= 1
            raise RuntimeError("embedder replica died")
        return await super().embed(texts)


def test_index_build_outlives_a_cancelled_request_and_a_failed_one_starts_over():
    async def run():
        emb = SlowEmbedder(0.3)
        r = _retriever(emb)
        # The first request gives up before the knowledge base is embedded (its deadline).
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(r.retrieve("dogs bark", 1), timeout=0.05)
        hits = await r.retrieve("dogs bark", 1)  # the same build finished; not started again
        assert hits[0].node_id == "dog" and emb.calls == 2 and emb.texts == 4 + 1  # one build, one query

        failing = _retriever(SlowEmbedder(0.0, failures=1), mode="dense")
        failing.retries = 0
        with pytest.raises(RuntimeError, match="embedder replica died"):
            await failing.ready()
        assert (await failing.ready())["index"] == "built"  # a failed build is retried

        warm = _retriever(SlowEmbedder(0.0))
        await warm.check_health()  # what Serve calls on a new replica: the build starts
        await asyncio.sleep(0.05)
        assert warm.index is not None and warm.index_source == "built"

    asyncio.run(run())


def test_bm25_and_hybrid_modes():
    async def run():
        emb = CountingEmbedder()
        bm25 = _retriever(emb, mode="bm25")
        assert (await bm25.retrieve("中国的首都", 2))[0].node_id == "zh" and emb.texts == 0  # no embedder
        hybrid = _retriever(emb, mode="hybrid")
        hits = await hybrid.retrieve("mailman dog", 2)
        assert [h.node_id for h in hits][0] == "dog"
        # Both rankings put "dog" first: its fused score is 2 / (60 + 1).
        assert hits[0].score == pytest.approx(2 / 61)

    asyncio.run(run())


def test_hybrid_needs_enough_candidates_for_top_k():
    with pytest.raises(RayFTError, match="retrieval.candidates=2 < top_k=5"):
        parse_job({"name": "x", "serve": {"top_k": 5, "retrieval": {"mode": "hybrid", "candidates": 2}}})


def _lance_retriever(emb, tmp_path, mode, fingerprint="e1"):
    spec = {"uri": str(tmp_path / "kb.lance"), "table": "nodes_passage", "fingerprint": fingerprint,
            "cfg": {"store": "lancedb", "refresh_s": 0}, "language": "zh"}
    return RetrieverDeployment.func_or_class(
        [], "passage", FakeHandle(emb), 30.0, 1, RetrievalSettings(mode=mode, candidates=4).model_dump(),
        None, "", spec)


@pytest.mark.parametrize("mode", ["dense", "bm25", "hybrid"])
def test_a_lancedb_retriever_ranks_like_the_memory_one_and_embeds_only_queries(tmp_path, mode):
    from ray_ft.data.nodes import build_nodes
    from ray_ft.kb.store import KnowledgeBase, node_row

    async def run():
        emb = CountingEmbedder()
        nodes = build_nodes(DOCS, "passage")
        kb = KnowledgeBase(str(tmp_path / "kb.lance"), "nodes_passage", "e1", None, language="zh")
        kb.upsert([node_row(n) for n in nodes], await emb.embed([n["text"] for n in nodes]))
        kb.ensure_indexes()
        emb.texts = 0
        lance, memory = _lance_retriever(emb, tmp_path, mode), _retriever(CountingEmbedder(), mode=mode)
        assert await lance.ready() == {"nodes": 4, "mode": mode, "index": "lancedb"} and emb.texts == 0
        for q in ["dogs bark at the mailman", "中国的首都", "revenue in fiscal 2023"]:
            got, want = await lance.retrieve(q, 2), await memory.retrieve(q, 2)
            assert [h.node_id for h in got][:1] == [h.node_id for h in want][:1], q
            if mode == "hybrid":
                assert got[0].score == pytest.approx(want[0].score)  # the same fusion
        assert emb.texts == (0 if mode == "bm25" else 3)  # the queries, never the nodes

        stale = _lance_retriever(emb, tmp_path, mode, fingerprint="e2")
        with pytest.raises(RayFTError, match=r"no vectors of the served embedder \(vec_e2\).*ray-ft kb build"):
            await stale.ready()

    asyncio.run(run())
