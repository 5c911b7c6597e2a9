"""Building the knowledge-base table on Ray Data with the real MiniLM: the vectors are the
embedder's, a rerun embeds only what changed, a build stopped after a commit resumes there."""

from __future__ import annotations

import numpy as np
import pytest

from ray_ft.config.knowledge_base import KnowledgeBaseConfig
from ray_ft.embedder import SentenceTransformerEmbedder
from ray_ft.kb import build as kb_build
from ray_ft.kb.build import build_knowledge_base
from ray_ft.kb.store import KnowledgeBase, embedder_fingerprint

pytestmark = pytest.mark.slow

TEXTS = [f"Company {i} reported revenue of {10 + i} million dollars in fiscal {2000 + i % 20}." for i in range(40)]


def _nodes(texts):
    return [{"node_id": f"n{i}", "text": t, "metadata": {"passage_id": f"d{i // 4}"}} for i, t in enumerate(texts)]


def test_build_embeds_with_the_real_embedder_and_reruns_embed_only_what_changed(ray_cluster, minilm_dir, tmp_path,
                                                                               monkeypatch):
    uri, cfg = str(tmp_path / "kb.lance"), KnowledgeBaseConfig(embed_batch_size=8, write_every=16, refresh_s=0)
    nodes = _nodes(TEXTS)

    # A build that dies after its first commit (16 nodes) keeps them.
    real_upsert, commits = KnowledgeBase.upsert, []

    def dying_upsert(self, rows, vectors):
        if commits:
            raise RuntimeError("driver killed")
        real_upsert(self, rows, vectors)
        commits.append(len(rows))

    monkeypatch.setattr(KnowledgeBase, "upsert", dying_upsert)
    with pytest.raises(RuntimeError, match="driver killed"):
        build_knowledge_base(nodes, uri, "nodes_passage", str(minilm_dir), cfg=cfg)
    monkeypatch.setattr(KnowledgeBase, "upsert", real_upsert)
    assert commits == [16]

    resumed = build_knowledge_base(nodes, uri, "nodes_passage", str(minilm_dir), cfg=cfg)
    assert (resumed.rows, resumed.embedded, resumed.removed) == (40, 24, 0) and resumed.indexes == ("text_idx",)
    assert resumed.fingerprint == embedder_fingerprint(str(minilm_dir))

    kb = KnowledgeBase(uri, "nodes_passage", resumed.fingerprint)
    direct = SentenceTransformerEmbedder(str(minilm_dir)).embed([TEXTS[7], "Company 7 reported revenue"])
    hits = kb.dense(direct[0], 3)
    assert hits[0].node_id == "n7" and hits[0].score == pytest.approx(1.0, abs=1e-4)
    by_id = {h.node_id: h.score for h in kb.dense(direct[1], 40)}
    assert by_id["n7"] == pytest.approx(float(direct[0] @ direct[1]), abs=1e-4)
    stored = kb.table.search().where("node_id = 'n7'").select([kb.column]).to_list()[0][kb.column]
    np.testing.assert_allclose(stored, direct[0], atol=1e-5)

    again = build_knowledge_base(nodes, uri, "nodes_passage", str(minilm_dir), cfg=cfg)
    assert again.embedded == 0 and again.rows == 40

    edited = [*nodes[:30], {**nodes[30], "text": "A completely different passage about rivers."}, *nodes[31:38]]
    monkeypatch.setattr(kb_build, "embedded_batches", _counting(kb_build.embedded_batches, seen := []))
    changed = build_knowledge_base(edited, uri, "nodes_passage", str(minilm_dir), cfg=cfg)
    assert (changed.rows, changed.embedded, changed.removed) == (38, 1, 2) and seen == ["n30"]
    assert KnowledgeBase(uri, "nodes_passage", changed.fingerprint).text("rivers", 1)[0].node_id == "n30"


def _counting(fn, seen):
    def wrapped(rows, *args, **kwargs):
        seen.extend(r["node_id"] for r in rows)
        yield from fn(rows, *args, **kwargs)
    return wrapped


def test_kb_add_reads_documents_and_a_re_added_document_replaces_its_nodes(ray_cluster, minilm_dir, tmp_path):
    from ray_ft.config import parse_job
    from ray_ft.kb.build import add_files, job_table

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "guide.md").write_text("# Install\n\nRun the installer twice.\n\n# Usage\n\nType ray-ft run.\n")
    (docs / "notes.txt").write_text("Quarterly revenue rose sharply.\n")
    cfg = parse_job({"name": "kbadd", "output_dir": str(tmp_path / "runs"), "serve": {"embedder": str(minilm_dir),
                     "knowledge_base": {"refresh_s": 0}}})
    first = add_files(cfg, [str(docs)], str(minilm_dir))
    assert (first.rows, first.embedded, first.removed) == (3, 3, 0)  # two sections + one text
    uri, table = job_table(cfg)
    assert uri == str(tmp_path / "runs" / "kbadd" / "knowledge_base.lance") and table == "nodes_passage"
    kb = KnowledgeBase(uri, table, first.fingerprint, cfg=cfg.serve.knowledge_base)
    hit = kb.text("installer", 1)[0]
    assert hit.metadata["document"].endswith("guide.md") and hit.metadata["heading"] == "Install"

    (docs / "guide.md").write_text("# Install\n\nRun the installer twice.\n")  # its Usage section is gone
    again = add_files(cfg, [str(docs / "guide.md")], str(minilm_dir))
    assert (again.rows, again.embedded, again.removed) == (2, 0, 1)
    assert kb.delete_documents([hit.metadata["document"]]) == 1 and kb.stats().rows == 1
