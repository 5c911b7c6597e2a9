"""The LanceDB knowledge base: rows keyed by node, vectors per embedder, LanceDB's searches
against reference computations written here (numpy cosine, Okapi BM25, reciprocal-rank fusion),
versions seen by a second reader, concurrent writers."""

from __future__ import annotations

import math
import multiprocessing as mp
from collections import Counter

import numpy as np
import pyarrow.fs as pafs
import pytest

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.errors import RayFTError
from ray_ft.kb.store import KnowledgeBase, embedder_fingerprint, node_row
from ray_ft.kb.terms import lexical_tokens

ZH = ["北京是中国的首都，也是政治和文化中心。", "上海是中国最大的城市，位于长江入海口。",
      "长城是古代中国修建的军事防御工程。", "熊猫主要生活在四川的山区，以竹子为食。",
      "黄河是中国第二长河，被称为母亲河。", "杭州的西湖以美丽的风景闻名。"]
EN = ["The cat sat on the mat and slept.", "A dog barked at the mailman every morning.",
      "Revenue grew twelve percent in fiscal 2023.", "The river flows north into the sea.",
      "Jumping foxes are quick and brown.", "Apple's net sales were 383 billion dollars."]


def _nodes(texts, prefix="p"):
    return [{"node_id": f"{prefix}{i}", "text": t, "metadata": {"passage_id": f"{prefix}{i}", "page": i}}
            for i, t in enumerate(texts)]


def _unit(n, dim=16, seed=0):
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def cosine_top(vecs, q, k):
    """Reference exact search: node indices by dot product (unit vectors: cosine), best first."""
    scores = vecs @ q
    order = np.argsort(-scores, kind="stable")[:k]
    return order, scores[order]


def bm25_top(texts, query, k1=1.2, b=0.75):
    """Reference Okapi BM25 (Lucene idf) over `lexical_tokens`: the index of the best text."""
    docs = [Counter(lexical_tokens(t)) for t in texts]
    avg = sum(sum(d.values()) for d in docs) / len(docs)
    def score(d):
        n = sum(d.values())
        return sum(math.log(1 + (len(docs) - df + 0.5) / (df + 0.5)) * d[t] * (k1 + 1)
                   / (d[t] + k1 * (1 - b + b * n / avg))
                   for t in set(lexical_tokens(query)) if (df := sum(t in e for e in docs)) and t in d)
    return max(range(len(docs)), key=lambda i: score(docs[i]))


def rrf(rankings, top_k, k=60):
    """Reference reciprocal-rank fusion: (node_id, sum of 1 / (k + rank)), best first."""
    fused = Counter()
    for ranking in rankings:
        for rank, hit in enumerate(ranking, 1):
            fused[hit.node_id] += 1 / (k + rank)
    return sorted(fused.items(), key=lambda kv: -kv[1])[:top_k]


def _kb(tmp_path, fp="e1", language="en", **cfg):
    return KnowledgeBase(str(tmp_path / "kb.lance"), "nodes_passage", fp, None,
                         KnowledgeBaseConfig(refresh_s=0, **cfg), language)


def test_rows_are_keyed_by_node_and_only_changed_or_unembedded_nodes_are_stale(tmp_path):
    kb, nodes = _kb(tmp_path), _nodes(EN)
    assert kb.stale(nodes) == nodes  # empty table
    kb.upsert([node_row(n) for n in nodes], _unit(6))
    assert kb.stale(nodes) == []
    changed = [*nodes[:5], {**nodes[5], "text": "Apple's net sales fell."}]
    assert kb.stale(changed) == [changed[5]]
    kb.upsert([node_row(changed[5])], _unit(1, seed=1))  # replaced, not duplicated
    assert kb.stats().rows == 6 and kb.stale(changed) == []
    other = _kb(tmp_path, fp="e2")  # another embedder: its own column, nothing embedded yet
    assert other.stale(changed) == changed
    with pytest.raises(RayFTError, match="16-d vectors, the embedder gives 8-d"):
        kb.upsert([node_row(nodes[0])], _unit(1, dim=8))
    hit = kb.dense(_unit(6)[2], 1)[0]
    assert hit.metadata == {"passage_id": "p2", "page": 2} and hit.text == EN[2]


def test_dense_search_is_exact_and_equals_numpy_cosine(tmp_path):
    kb, nodes, vecs = _kb(tmp_path), _nodes(EN * 20, "n"), _unit(120)
    kb.upsert([node_row(n) for n in nodes], vecs)
    for q in _unit(5, seed=3):
        (order, scores), got = cosine_top(vecs, q, 10), kb.dense(q, 10)
        assert [h.node_id for h in got] == [nodes[i]["node_id"] for i in order]
        np.testing.assert_allclose([h.score for h in got], scores, atol=1e-5)


@pytest.mark.parametrize("language, tokenizer, texts, queries", [
    ("zh", "auto", ZH, ["中国的首都是哪里", "熊猫吃什么", "西湖在哪个城市", "中国最大的城市"]),
    ("zh", "ngram", ZH, ["中国的首都是哪里", "熊猫吃什么", "西湖在哪个城市", "中国最大的城市"]),
    ("en", "auto", EN, ["where did the cat sleep", "fiscal revenue growth", "quick brown fox jumps", "net sales"]),
])
def test_full_text_search_finds_what_bm25_finds(tmp_path, language, tokenizer, texts, queries):
    """Lance's BM25 with the language's tokenizer (for zh: character unigrams + bigrams in `terms`,
    or Lance's character 1-2-grams; stemmed words for en) puts the same node first as a reference
    Okapi BM25."""
    nodes = _nodes(texts)
    kb = _kb(tmp_path, language=language, fts_tokenizer=tokenizer)
    kb.upsert([node_row(n) for n in nodes], _unit(len(nodes)))
    cjk = language == "zh" and tokenizer == "auto"
    assert kb.ensure_indexes() == (("terms_idx",) if cjk else ("text_idx",))
    terms = kb.table.search().select(["terms"]).limit(1).to_list()[0]["terms"]
    assert terms == (" ".join(lexical_tokens(texts[0])) if cjk else None)
    reader = _kb(tmp_path, language="en")  # a replica's config does not override the table's index
    assert reader.fts_column == kb.fts_column == ("terms" if cjk else "text")
    for q in queries:
        assert kb.text(q, 1)[0].node_id == nodes[bm25_top(texts, q)]["node_id"], q
    assert kb.text("   ", 3) == []
    assert kb.text("it's \"quoted\": AND OR (", 3) is not None  # query syntax is not parsed


def test_english_tokenizer_stems_and_rows_added_after_the_index_are_searched(tmp_path):
    kb = _kb(tmp_path)
    kb.upsert([node_row(n) for n in _nodes(EN)], _unit(6))
    kb.ensure_indexes()
    assert kb.text("jumps", 1)[0].node_id == "p4"  # "Jumping" stems to the same term
    kb.upsert([node_row({"node_id": "late", "text": "A zebra arrived late.", "metadata": {}})], _unit(1, seed=5))
    assert kb.text("zebra", 1)[0].node_id == "late"  # before any re-index


def test_hybrid_is_reciprocal_rank_fusion_of_the_two_rankings(tmp_path):
    nodes, vecs = _nodes(EN * 5, "n"), _unit(30)
    kb = _kb(tmp_path)
    kb.upsert([node_row(n) for n in nodes], vecs)
    kb.ensure_indexes()
    q, text = _unit(1, seed=9)[0], "cat mat fiscal revenue"
    fused = kb.hybrid(q, text, top_k=30, candidates=30, rrf_k=60)
    want = rrf([kb.dense(q, 30), kb.text(text, 30)], 30, 60)
    assert len(fused) == 30 and [round(h.score, 6) for h in fused] == [round(s, 6) for _, s in want]
    assert {(h.node_id, round(h.score, 6)) for h in fused} == {(i, round(s, 6)) for i, s in want}
    assert [h.node_id for h in kb.hybrid(q, text, 3, 30, 60)] == [h.node_id for h in fused[:3]]


def test_deletes_and_a_second_reader_sees_each_new_version(tmp_path):
    writer = _kb(tmp_path)
    writer.upsert([node_row(n) for n in _nodes(EN)], _unit(6))
    reader = _kb(tmp_path)  # a replica's view (refresh_s=0: checks the version before each read)
    v = reader.stats().version
    assert writer.delete_documents(["p1", "absent"]) == 1
    assert reader.stats().rows == 5 and reader.stats().version > v
    assert writer.delete_nodes_except({"p0", "p2"}) == 3
    assert sorted(h.node_id for h in reader.dense(_unit(6)[0], 10)) == ["p0", "p2"]
    with pytest.raises(RayFTError, match="no knowledge-base table 'other'"):
        KnowledgeBase(str(tmp_path / "kb.lance"), "other", "e1", create=False)


def _write(uri: str, start: int) -> None:
    kb = KnowledgeBase(uri, "nodes_passage", "e1", 16, KnowledgeBaseConfig())
    for i in range(start, start + 40, 10):
        nodes = [{"node_id": f"w{j}", "text": f"node {j}", "metadata": {}} for j in range(i, i + 10)]
        kb.upsert([node_row(n) for n in nodes], _unit(10, seed=i))


def test_concurrent_writers_lose_no_commit(tmp_path):
    uri = str(tmp_path / "kb.lance")
    KnowledgeBase(uri, "nodes_passage", "e1", 16)  # the table exists before the writers race
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write, args=(uri, s)) for s in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    kb = KnowledgeBase(uri, "nodes_passage", "e1")
    assert kb.stats().rows == 80 and kb.stale([{"node_id": "w1005", "text": "node 1005"}]) == []


def test_embedder_fingerprint_follows_the_bytes_not_the_path(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        d.mkdir()
        (d / "config.json").write_text("{}")
        (d / "model.safetensors").write_bytes(b"\0" * 1000)
    assert embedder_fingerprint(str(a)) == embedder_fingerprint(str(b)) != embedder_fingerprint(str(a), "bfloat16")
    (b / "model.safetensors").write_bytes(b"\1" + b"\0" * 999)
    assert embedder_fingerprint(str(a)) != embedder_fingerprint(str(b))
    with pytest.raises(RayFTError, match="no embedder files"):
        embedder_fingerprint(str(tmp_path / "empty"))


def test_a_knowledge_base_on_object_storage(s3):
    """The same table on S3 (moto's server on loopback): written, searched, and opened by a
    second reader; endpoint and region from storage_options, credentials from the environment."""
    fs, query = s3
    fs.create_dir("kb-bucket")
    endpoint = "http://" + query.split("endpoint_override=")[1].split("&")[0]
    cfg = KnowledgeBaseConfig(refresh_s=0, storage_options={"aws_endpoint": endpoint, "aws_region": "us-east-1",
                                                            "allow_http": "true"})
    kb = KnowledgeBase("s3://kb-bucket/runs/job/knowledge_base.lance", "nodes_passage", "e1", None, cfg, "en")
    kb.upsert([node_row(n) for n in _nodes(EN)], _unit(6))
    kb.ensure_indexes()
    reader = KnowledgeBase("s3://kb-bucket/runs/job/knowledge_base.lance", "nodes_passage", "e1", None, cfg, "en",
                           create=False)
    assert reader.stats().rows == 6 and reader.dense(_unit(6)[3], 1)[0].node_id == "p3"
    assert reader.text("fiscal revenue", 1)[0].node_id == "p2"
    files = fs.get_file_info(pafs.FileSelector("kb-bucket", recursive=True))
    assert any(f.path.startswith("kb-bucket/runs/job/knowledge_base.lance/nodes_passage.lance/") for f in files)


def test_a_replica_sees_a_write_within_refresh_s(tmp_path):
    import time

    writer = _kb(tmp_path)
    writer.upsert([node_row(n) for n in _nodes(EN[:2])], _unit(2))
    reader = KnowledgeBase(str(tmp_path / "kb.lance"), "nodes_passage", "e1", None, KnowledgeBaseConfig(refresh_s=1.0))
    assert reader.stats().rows == 2
    writer.upsert([node_row(n) for n in _nodes(EN[2:4], "q")], _unit(2, seed=4))
    t0 = time.monotonic()
    while reader.stats().rows != 4:
        assert time.monotonic() - t0 < 5, "the reader never saw the new version"
        time.sleep(0.05)
    assert time.monotonic() - t0 <= 1.5  # bounded by refresh_s (plus a poll)


def test_documents_written_to_an_empty_table_are_found_by_full_text_search(tmp_path):
    kb = _kb(tmp_path)
    assert kb.ensure_indexes() == ()  # nothing to index yet
    out = kb.replace_documents(_nodes(EN[:3]), _unit(3))
    assert out["nodes"] == 3 and kb.text("mailman", 1)[0].node_id == "p1"
    assert kb.hybrid(_unit(3)[1], "mailman", 1, 3)[0].node_id == "p1"
