import json

import numpy as np
import pytest
import yaml

from ray_ft.data.nodes import build_nodes
from ray_ft.errors import RayFTError
from ray_ft.kb.store import KnowledgeBase, embedder_fingerprint, node_row
from ray_ft.serve.entry import app_builder


def _job(tmp_path, **extra):
    job = {"name": "svc", "output_dir": str(tmp_path / "runs"), **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_app_builder_binds_the_rag_graph_of_a_finished_run(tmp_path, smollm_dir, minilm_dir):
    from ray.serve import Application

    run = tmp_path / "runs" / "svc"
    (run / "data").mkdir(parents=True)
    (run / "data" / "knowledge_base.jsonl").write_text(json.dumps({"passage_id": "p1", "text": "北京是首都。"}) + "\n")
    with pytest.raises(RayFTError, match="no LoRA adapter here"):
        app_builder({"job": str(_job(tmp_path))})
    (run / "train" / "adapter").mkdir(parents=True)
    (run / "train" / "adapter" / "adapter_config.json").write_text("{}")

    # Unmerged: the adapter on the base engine (on CPU `auto` merges it first: tests/serve/test_adapters.py).
    job = str(_job(tmp_path, serve={"finetuned_adapter": "unmerged"}))
    with pytest.raises(RayFTError, match=r"knowledge_base.lance/nodes_passage: 1 of 1 knowledge-base nodes lack "
                                         r"the served embedder's vectors; run `ray-ft kb build .*job.yaml` first"):
        app_builder({"job": job})
    # What `ray-ft kb build` writes (vectors made up: the builder checks rows, not values).
    kb = KnowledgeBase(str((run / "knowledge_base.lance").resolve()), "nodes_passage", embedder_fingerprint(str(minilm_dir)))
    kb.upsert([node_row(n) for n in build_nodes([{"passage_id": "p1", "text": "北京是首都。"}], "passage")],
              np.ones((1, 384), dtype=np.float32))
    app = app_builder({"job": job})
    assert isinstance(app, Application)
    # The ingress is bound to the generator, retriever and embedder; the adapter is served as "svc".
    gen = next(a for a in app._bound_deployment.init_args if "Generator" in a._bound_deployment.name)
    assert gen._bound_deployment.init_kwargs["adapters"] == {"svc": str((run / "train" / "adapter").resolve())}


def test_app_builder_errors_name_what_is_missing(tmp_path):
    with pytest.raises(RayFTError, match="needs the argument job="):
        app_builder({})
    with pytest.raises(RayFTError, match="knowledge_base.jsonl: no knowledge base; run `ray-ft prepare"):
        app_builder({"job": str(_job(tmp_path, eval={"models": ["base"]}))})
