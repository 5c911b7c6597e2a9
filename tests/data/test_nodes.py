"""Knowledge base: plain-text documents and node groups (passage, line, sentence, chunk)."""

import pytest

from ray_ft.config import NodeGroupConfig
from ray_ft.data.nodes import build_nodes, chunk_spans, read_text_documents, split_sentences
from ray_ft.errors import RayFTError


def test_sentences_in_chinese_and_english():
    assert split_sentences("北京是首都。上海很大！对吗？好") == ["北京是首都。", "上海很大！", "对吗？", "好"]
    assert split_sentences("It costs 3.5 dollars. Really? Yes!  Done") == [
        "It costs 3.5 dollars.", "Really?", "Yes!", "Done"]


def test_chunks_cover_the_text_with_the_overlap():
    text = "".join(chr(ord("a") + i % 26) for i in range(100))
    spans = chunk_spans(text, 40, 10)
    assert spans == [(0, 40), (30, 70), (60, 100)]
    for (a1, b1), (a2, _) in zip(spans, spans[1:]):
        assert b1 - a2 == 10  # consecutive chunks share exactly the overlap
    assert chunk_spans("short", 40, 10) == [(0, 5)]


def test_node_groups_name_their_passage():
    docs = [{"passage_id": "p1", "text": "Line one. Still one.\n\nLine two!"}, {"passage_id": "p2", "text": "solo"}]
    assert [n["node_id"] for n in build_nodes(docs, "passage")] == ["p1", "p2"]
    assert [(n["node_id"], n["text"]) for n in build_nodes(docs, "line")] == [
        ("p1:0", "Line one. Still one."), ("p1:2", "Line two!"), ("p2:0", "solo")]
    assert [n["text"] for n in build_nodes(docs, "sentence")] == ["Line one.", "Still one.", "Line two!", "solo"]
    chunks = build_nodes(docs, NodeGroupConfig(kind="chunk", chunk_size=16, chunk_overlap=4))
    p1 = [n for n in chunks if n["metadata"]["passage_id"] == "p1"]
    assert "".join(n["text"][: 12] for n in p1[:-1]) + p1[-1]["text"] == docs[0]["text"]
    assert all(n["metadata"]["start"] == 12 * i for i, n in enumerate(p1))
    with pytest.raises(ValueError, match="chunk_overlap=16 must be smaller than chunk_size=16"):
        NodeGroupConfig(kind="chunk", chunk_size=16, chunk_overlap=16)


def test_plain_text_documents_from_files_and_folders(tmp_path):
    (tmp_path / "kb").mkdir()
    (tmp_path / "kb" / "a.txt").write_text("Alpha doc.\n", encoding="utf-8")
    (tmp_path / "kb" / "sub").mkdir()
    (tmp_path / "kb" / "sub" / "b.md").write_text("# Beta\nBeta doc.", encoding="utf-8")
    (tmp_path / "kb" / "skip.bin").write_bytes(b"\x00")
    (tmp_path / "c.txt").write_text("Gamma.", encoding="utf-8")
    docs = read_text_documents([str(tmp_path / "kb"), str(tmp_path / "c.txt")])
    assert [d["text"] for d in docs] == ["Alpha doc.", "# Beta\nBeta doc.", "Gamma."]
    assert len({d["passage_id"] for d in docs}) == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(RayFTError, match="empty: no .txt or .md files in this folder"):
        read_text_documents([str(tmp_path / "empty")])
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff")
    with pytest.raises(RayFTError, match=r"bad.txt: line 2: not UTF-8 text"):
        read_text_documents([str(tmp_path / "bad.txt")])
