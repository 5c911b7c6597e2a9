"""Ray Data retrieval jobs with the real MiniLM: RA-DIT augmentation and hard-negative mining."""

import json

import numpy as np
import pytest

from ray_ft.config import HardNegativeConfig, RetrievalAugmentConfig, parse_job
from ray_ft.data.retrieval import top_n
from ray_ft.data.triplets import QAPair, build_triplets, read_qa_csv
from tests.conftest import FINQA


def test_top_n_orders_by_score_then_index():
    corpus = np.array([[1, 0], [0.6, 0.8], [0, 1], [1, 0]], dtype=np.float32)
    ids, scores = top_n(np.array([[1, 0], [0, 1]], dtype=np.float32), corpus, 3)
    assert ids.tolist() == [[0, 3, 1], [2, 1, 0]]
    np.testing.assert_allclose(scores, [[1, 1, 0.6], [1, 0.8, 0]], atol=1e-6)


@pytest.mark.slow
def test_embedding_on_two_actors_matches_the_local_embedder(ray_cluster, minilm_dir):
    from ray_ft.data.retrieval import embed_corpus_and_queries
    from ray_ft.embedder import SentenceTransformerEmbedder

    texts = [f"Document {i} is about {topic}." for i, topic in enumerate(["rivers", "mountains", "taxes", "cats"] * 80)]
    vecs, qvecs = embed_corpus_and_queries(texts, ["mountains", "cats"], str(minilm_dir), "topic: ", workers=2)
    local = SentenceTransformerEmbedder(str(minilm_dir))
    np.testing.assert_allclose(vecs, local.embed(texts), atol=1e-5)  # same vectors, same (input) order
    np.testing.assert_allclose(qvecs, local.embed(["topic: mountains", "topic: cats"]), atol=1e-5)
    ids, scores = top_n(qvecs, vecs, 5)
    assert all(texts[j].endswith("mountains.") for j in ids[0]) and all(texts[j].endswith("cats.") for j in ids[1])
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.slow
def test_retrieval_augmented_examples(ray_cluster, cmrc_slice, tmp_path, smollm_dir, minilm_dir):
    from ray_ft.data.prepare import prepare
    from ray_ft.data.radit import augment_with_retrieval
    from ray_ft.data.readers import read_source

    recs = read_source(str(cmrc_slice)).qa[:30]
    passages = {r.passage_id: r.context for r in recs}
    rows, stats = augment_with_retrieval(recs, RetrievalAugmentConfig(enabled=True, top_k=3), str(minilm_dir), 2)
    # separate_context: k examples per question, each with one retrieved passage's text.
    assert len(rows) == 3 * len(recs) and stats["examples"] == len(rows)
    for rec, group in zip(recs, [rows[i:i + 3] for i in range(0, len(rows), 3)]):
        assert [r["id"] for r in group] == [f"{rec.id}#r{k}" for k in range(3)]
        assert len({r["context_ids"][0] for r in group}) == 3
        for r in group:
            assert r["context"] == passages[r["context_ids"][0]] and r["answers"][0] == rec.answers[0]
    gold_in = sum(rec.passage_id in {r["context_ids"][0] for r in rows[3 * i:3 * i + 3]} for i, rec in enumerate(recs))
    assert stats["gold_in_top_k"] == round(gold_in / len(recs), 4) and stats["gold_at_1"] <= stats["gold_in_top_k"]

    joined, jstats = augment_with_retrieval(recs, RetrievalAugmentConfig(enabled=True, top_k=2, separate_context=False),
                                            str(minilm_dir), 1)
    assert len(joined) == len(recs) and all(len(r["context_ids"]) == 2 for r in joined)
    assert joined[0]["context"] == "\n\n".join(passages[p] for p in joined[0]["context_ids"])

    # Through the prepare stage: the examples' records name the passages they were built from.
    cfg = parse_job({"name": "ra", "model": {"name": str(smollm_dir)}, "data": {
        "source": str(cmrc_slice), "max_samples": 20, "num_shards": 1, "cutoff_len": 1500,
        "retrieval_augment": {"enabled": True, "embedder": str(minilm_dir), "top_k": 2}}})
    prepared = prepare(cfg, tmp_path / "data")
    m = prepared.manifest()
    assert m["retrieval_augment"]["examples"] == 2 * m["train_questions"] == m["built_examples"]
    sft = [json.loads(line) for line in prepared.sft_file.read_text().splitlines()]
    all_passages = {r.passage_id: r.context for r in read_source(str(cmrc_slice)).qa}
    assert len(sft) == 20 and all("#r" in s["id"] and len(s["context_ids"]) == 1 for s in sft)
    for s in sft:
        assert all_passages[s["context_ids"][0]][:50] in s["messages"][0]["content"]


@pytest.mark.slow
@pytest.mark.skipif(not FINQA.is_file(), reason="needs ../shared/datasets/financial-qa-10k")
def test_hard_negatives_come_from_the_window_and_are_harder_than_random(ray_cluster, minilm_dir, tmp_path):
    from ray_ft.data.hard_negatives import mine_hard_negatives
    from ray_ft.embedder import SentenceTransformerEmbedder

    pairs, _ = read_qa_csv(FINQA, on_error="skip")
    pairs = pairs[:300]
    hcfg = HardNegativeConfig(enabled=True, range_for_sampling=(3, 30))
    mined, stats = mine_hard_negatives(pairs, 5, 1314, hcfg, str(minilm_dir), 2)
    assert stats["queries"] == len(mined) == len({(p.question, p.context) for p in pairs})
    assert 3 <= stats["mean_sampled_rank"] < 30 and stats["queries_filled_randomly"] == 0

    emb = SentenceTransformerEmbedder(str(minilm_dir))
    pool = sorted({p.context for p in pairs})
    pool_vecs = dict(zip(pool, emb.embed(pool)))
    sample = pairs[:60]
    qvecs = emb.embed([p.question for p in sample])
    hard_sims, random_sims = [], []
    randoms = {(t["query"], t["pos"][0]): t["neg"] for t in build_triplets(pairs, 5, 1314)}
    for p, q in zip(sample, qvecs):
        neg = mined[(p.question, p.context)]
        assert len(neg) == len(set(neg)) == 5 and p.context not in neg
        sims = sorted((float(pool_vecs[c] @ q) for c in pool), reverse=True)
        # Every mined negative ranks inside [3, 30) for its query (ties aside).
        assert all(sims[29] - 1e-5 <= float(pool_vecs[c] @ q) <= sims[3] + 1e-5 for c in neg)
        hard_sims += [float(pool_vecs[c] @ q) for c in neg]
        random_sims += [float(pool_vecs[c] @ q) for c in randoms[(p.question, p.context)]]
    assert np.mean(hard_sims) > np.mean(random_sims) + 0.2

    # Through the embedding data stage: mined triplets on the training split, written with a manifest.
    from ray_ft.data.embed_data import prepare_embedding_data

    src = tmp_path / "qa.csv"
    src.write_text("question,answer,context\n" + "".join(
        f'"{p.question}","","{p.context}"\n' for p in pairs if '"' not in p.question + p.context), encoding="utf-8")
    cfg = parse_job({"name": "hn", "task": "embedding", "data": {"num_workers": 1}, "embed": {
        "source": str(src), "neg_num": 4, "val_size": 0.0, "hard_negatives": {"enabled": True, "range_for_sampling": [2, 20]}}})
    data = prepare_embedding_data(cfg, tmp_path / "embed_data")
    assert data.manifest["negatives"] == "mined" and data.manifest["hard_negatives"]["queries_filled_randomly"] == 0
    assert len(data.triplets) == data.manifest["train_pairs"] and not {p.context for p in data.test} & {
        t["pos"][0] for t in data.triplets}
    assert all(len(set(t["neg"])) == 4 and t["pos"][0] not in t["neg"] for t in data.triplets)
    assert (tmp_path / "embed_data" / "manifest.json").is_file() and not list(tmp_path.glob(".embed_data.*"))


def test_short_window_is_filled_with_random_negatives(monkeypatch):
    """The mining arithmetic alone (vectors faked, no Ray): 4 ranks in the window minus the
    positive cannot give 5 negatives, so every query is filled up at random, never with its positive."""
    from ray_ft.data import hard_negatives

    def fake_vectors(corpus, queries, *_args):
        rng = np.random.default_rng(0)
        vecs = rng.normal(size=(len(corpus) + len(queries), 8)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        return vecs[: len(corpus)], vecs[len(corpus):]

    monkeypatch.setattr(hard_negatives, "embed_corpus_and_queries", fake_vectors)
    small = [QAPair(i, f"question {i}", f"context {i}", "") for i in range(8)]
    hcfg = HardNegativeConfig(enabled=True, range_for_sampling=(2, 6))
    few, stats = hard_negatives.mine_hard_negatives(small, 5, 1, hcfg, "unused", 1)
    assert stats["queries_filled_randomly"] == 8 and 2 <= stats["mean_sampled_rank"] < 6
    assert all(len(set(v)) == 5 and k[1] not in v for k, v in few.items())
    assert hard_negatives.mine_hard_negatives(small, 5, 1, hcfg, "unused", 1)[0] == few  # seeded
    wide, _ = hard_negatives.mine_hard_negatives(small, 3, 1, HardNegativeConfig(enabled=True, range_for_sampling=(0, 8)),
                                                 "unused", 1)
    assert all(k[1] not in v and len(set(v)) == 3 for k, v in wide.items())
