"""The retriever deployment over the job's LanceDB table, called in-process with a letter-count
fake embedder handle (no cluster): what each mode ranks, that only queries are embedded, and
how a replica opens the table."""

import asyncio

import numpy as np
import pytest

from ray_ft.config import RetrievalSettings, parse_job
from ray_ft.data.nodes import build_nodes
from ray_ft.errors import RayFTError
from ray_ft.kb.store import KnowledgeBase, node_row
from ray_ft.serve.retriever import RetrieverDeployment
from tests.serve.fakes import FakeHandle

DOCS = [{"passage_id": "cat", "text": "The cat sat on the mat. Cats like mats."},
        {"passage_id": "dog", "text": "A dog barked at the mailman."},
        {"passage_id": "zh", "text": "北京是中国的首都。"},
        {"passage_id": "fin", "text": "Revenue grew 12% in fiscal 2023."}]


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


def _write_table(tmp_path, emb, fingerprint="e1", docs=DOCS):
    nodes = build_nodes(docs, "passage")
    kb = KnowledgeBase(str(tmp_path / "kb.lance"), "nodes_passage", fingerprint, None, language="zh")
    kb.upsert([node_row(n) for n in nodes], asyncio.run(emb.embed([n["text"] for n in nodes])))
    kb.ensure_indexes()
    emb.texts = 0
    return nodes


def _retriever(emb, tmp_path, mode="dense", fingerprint="e1"):
    spec = {"uri": str(tmp_path / "kb.lance"), "table": "nodes_passage", "fingerprint": fingerprint,
            "cfg": {"refresh_s": 0}, "language": "zh"}
    return RetrieverDeployment.func_or_class(
        spec, "passage", FakeHandle(emb), 30.0, 1, RetrievalSettings(mode=mode, candidates=4).model_dump())


def test_dense_mode_ranks_by_cosine_and_embeds_only_the_query(tmp_path):
    emb = CountingEmbedder()
    nodes = _write_table(tmp_path, emb)
    vecs = asyncio.run(CountingEmbedder().embed([n["text"] for n in nodes]))

    async def run():
        r = _retriever(emb, tmp_path)
        assert await r.ready() == {"nodes": 4, "mode": "dense", "table_version": r.store.kb.table.version}
        assert emb.texts == 0  # opening the table embeds nothing
        for query in ["dogs bark at the mailman", "revenue in fiscal 2023", "a cat on a mat"]:
            hits = await r.retrieve(query, 3)
            q = (await CountingEmbedder().embed([query]))[0]
            want = np.argsort(-(vecs @ q), kind="stable")[:3]
            assert [h.node_id for h in hits] == [nodes[i]["node_id"] for i in want], query
            assert [h.score for h in hits] == pytest.approx([float(vecs[i] @ q) for i in want], abs=1e-5)
        assert emb.texts == 3  # one per query

    asyncio.run(run())


def test_bm25_mode_needs_no_embedder_and_hybrid_fuses_both_rankings(tmp_path):
    emb = CountingEmbedder()
    _write_table(tmp_path, emb)

    async def run():
        bm25 = _retriever(emb, tmp_path, mode="bm25")
        assert (await bm25.retrieve("中国的首都", 2))[0].node_id == "zh"
        assert (await bm25.retrieve("fiscal revenue", 2))[0].node_id == "fin" and emb.texts == 0
        hybrid = _retriever(emb, tmp_path, mode="hybrid")
        hits = await hybrid.retrieve("mailman dog", 2)
        # Both rankings put "dog" first: its fused score is 2 / (60 + 1).
        assert hits[0].node_id == "dog" and hits[0].score == pytest.approx(2 / 61)

    asyncio.run(run())


def test_reconfigure_changes_the_ranking_of_a_running_replica_and_rejects_auto(tmp_path):
    emb = CountingEmbedder()
    _write_table(tmp_path, emb)

    async def run():
        r = _retriever(emb, tmp_path, mode="bm25")
        assert (await r.retrieve("fiscal revenue", 1))[0].node_id == "fin" and emb.texts == 0
        version = (await r.ready())["table_version"]
        r.reconfigure({"retrieval": {"mode": "dense"}})
        assert (await r.ready()) == {"nodes": 4, "mode": "dense", "table_version": version}
        await r.retrieve("fiscal revenue", 1)
        assert emb.texts == 1  # dense now: the query is embedded
        with pytest.raises(ValueError, match="'auto' must be resolved"):
            r.reconfigure({"retrieval": {"mode": "auto"}})
        assert r.r.mode == "dense"  # the old settings stay
        r.reconfigure({"retrieval": {"mode": "hybrid", "rrf_k": 10, "candidates": 4}})
        hits = await r.retrieve("mailman dog", 2)
        assert hits[0].node_id == "dog" and hits[0].score == pytest.approx(2 / 11)

    asyncio.run(run())


def test_a_replica_without_its_embedders_vectors_names_the_build_and_opens_once_built(tmp_path):
    emb = CountingEmbedder()
    _write_table(tmp_path, emb, fingerprint="e1")

    async def run():
        r = _retriever(emb, tmp_path, fingerprint="e2")  # another embedder than the table's
        with pytest.raises(RayFTError, match=r"no vectors of the served embedder \(vec_e2\).*ray-ft kb build"):
            await r.ready()
        await asyncio.to_thread(_write_table, tmp_path, emb, "e2")  # `ray-ft kb build` with e2
        assert (await r.ready())["nodes"] == 4  # a failed opening starts over on the next call
        warm = _retriever(emb, tmp_path)
        await warm.check_health()  # what Serve calls on a new replica: the opening starts
        await asyncio.sleep(0.5)
        assert warm.opened

    asyncio.run(run())


def test_no_table_at_all_is_a_clear_error(tmp_path):
    with pytest.raises(RayFTError, match=r"no knowledge-base table 'nodes_passage'; build it first"):
        asyncio.run(_retriever(CountingEmbedder(), tmp_path).ready())


def test_hybrid_needs_enough_candidates_for_top_k():
    with pytest.raises(RayFTError, match="retrieval.candidates=2 < top_k=5"):
        parse_job({"name": "x", "serve": {"top_k": 5, "retrieval": {"mode": "hybrid", "candidates": 2}}})
