"""Documents -> QA pairs with the real packaged SmolLM2 on vLLM CPU inside Ray Data, through
`prepare`: the replies keep to the JSON schema, every drop is counted in the manifest, the pairs
land in data/generated_qa.jsonl and the knowledge base holds every node."""

from __future__ import annotations

import json
import shutil

import jsonschema
import pytest

import ray_ft.data.qa_writers as qa_writers
from ray_ft.config import parse_job
from ray_ft.data.documents import list_documents, parse_document
from ray_ft.data.nodes import document_nodes
from ray_ft.data.prepare import prepare
from ray_ft.data.qa_generation import answer_schema, questions_schema
from tests.conftest import ROOT

DROPS_AFTER_ANSWERING = ("answer_replies_unparseable", "answer_requests_failed", "question_too_short",
                         "question_too_long", "answer_too_short", "answer_too_long",
                         "question_contains_answer", "question_not_self_contained", "answer_not_supported",
                         "duplicate_question", "near_duplicate_question")


class Recording:
    """The real writer, with the outcome rows of both steps kept (with the schema each asked for)."""

    def __init__(self, inner):
        self.inner, self.seen = inner, []

    def write(self, nodes, gen, language):
        out = self.inner.write(nodes, gen, language)
        schemas = {"questions": questions_schema(gen.questions_per_node, gen.filters.max_question_chars),
                   "answers": answer_schema(gen.filters.max_answer_chars)}
        self.seen += [(schemas[o["step"]], o) for o in out]
        return out


@pytest.mark.slow
def test_smollm_on_vllm_in_ray_data_writes_counted_schema_checked_pairs(tmp_path, smollm_dir, ray_cluster,
                                                                        monkeypatch):
    docs = tmp_path / "docs"
    docs.mkdir()
    for name in ("crew_guide.md", "passenger_handbook.pdf"):
        shutil.copy(ROOT / "jobs" / "documents" / name, docs / name)
    recorders = []
    real = qa_writers.writer_for
    monkeypatch.setattr(qa_writers, "writer_for", lambda cfg, d: recorders.append(Recording(real(cfg, d))) or recorders[-1])
    job = {"name": "gen", "output_dir": str(tmp_path / "runs"), "model": {"name": str(smollm_dir)},
           "serve": {"vllm": {"max_model_len": 2048, "dtype": "float32"}},  # fp32: greedy replies as on a CPU without bf16
           "data": {"documents": [str(docs)], "eval_size": 0.34, "seed": 3, "cutoff_len": 1024,
                    # min_support 0: SmolLM2-135M's answers are rarely grounded in the node (the
                    # support filter is tested with hand-made replies); here some pairs must survive
                    "qa_generation": {"questions_per_node": 2, "max_nodes": 4, "batch_size": 8,
                                      "filters": {"min_support": 0.0}}}}
    cfg = parse_job(job)
    prepared = prepare(cfg, tmp_path / "data")

    # the replies: JSON of the schema asked for, unless cut off by max_tokens (then counted)
    (rec,) = recorders
    step1 = [(s, o) for s, o in rec.seen if s == questions_schema(2, 300)]
    step2 = [(s, o) for s, o in rec.seen if s == answer_schema(400)]
    assert len(step1) == 4 and len(step1) + len(step2) == len(rec.seen)
    parsed = 0
    for schema, out in rec.seen:
        assert out["error"] == "" and out["generated_tokens"] > 0
        try:
            reply = json.loads(out["reply"])
        except json.JSONDecodeError:
            continue
        jsonschema.validate(reply, schema)
        parsed += 1
    m = prepared.manifest()
    g = m["qa_generation"]
    assert m["source"] == "data.documents" and g["writer"].startswith("vLLM in Ray Data")
    assert (g["nodes_asked"], g["questions_requested"]) == (4, 8)
    assert g["questions_parsed"] == len(step2) > 0
    assert g["question_replies_unparseable"] + g["answer_replies_unparseable"] == len(rec.seen) - parsed
    assert g["kept"] + sum(g[k] for k in DROPS_AFTER_ANSWERING) == g["questions_parsed"]
    assert g["generated_tokens"] == sum(o["generated_tokens"] for _, o in rec.seen)
    assert g["documents"]["by_kind"] == {"markdown": 1, "pdf": 1} and g["reused"] is False

    # data/generated_qa.jsonl: the kept pairs, each naming its node, document and page / heading
    rows = [json.loads(x) for x in (prepared.root / "generated_qa.jsonl").read_text().splitlines()]
    nodes = {n["node_id"]: n for s, name in list_documents([str(docs)])
             for n in document_nodes(parse_document(s, name, open(s, "rb").read()), cfg.data.document_nodes)}
    assert len(rows) == g["kept"] == m["records"]
    for r in rows:
        node = nodes[r["node_id"]]
        assert r["context"] == node["text"] and r["document"] == node["metadata"]["document"]
        assert r.get("page") == node["metadata"].get("page") and r.get("heading") == node["metadata"].get("heading")
    # the knowledge base is every node, asked or not
    kb = [json.loads(x) for x in prepared.knowledge_base_file.read_text().splitlines()]
    assert {d["text"] for d in kb} == {n["text"] for n in nodes.values()} and g["nodes"] == len(nodes) > 4

    # another split reuses the pairs: no engine starts
    recorders.clear()
    again = prepare(parse_job({**job, "data": {**job["data"], "eval_size": 0.5}}), tmp_path / "data2")
    assert recorders == [] and again.manifest()["qa_generation"]["reused"] is True
    assert (again.root / "generated_qa.jsonl").read_text() == (prepared.root / "generated_qa.jsonl").read_text()
