"""cluster/serve/serve_config.yaml (for `serve run` / `serve deploy`) is valid for Ray Serve and
overrides only deployments the graph has, with settings our deployments accept."""

import importlib
from pathlib import Path

import yaml

from ray_ft.config import EmbedderBatching, load_job, parse_job
from ray_ft.serve.app import build_rag_app

ROOT = Path(__file__).resolve().parents[2]


def _deployment_names(app) -> set[str]:
    names, todo = set(), [app]
    while todo:
        node = todo.pop()
        names.add(node._bound_deployment.name)
        args = [*node._bound_deployment.init_args, *node._bound_deployment.init_kwargs.values()]
        args += [v for a in args if isinstance(a, dict) for v in a.values()]  # the whole-model engines
        todo += [a for a in args if hasattr(a, "_bound_deployment")]
    return names


def test_serve_config_file_validates_and_names_real_deployments(minilm_dir):
    from ray.serve.schema import ServeDeploySchema

    text = (ROOT / "cluster" / "serve" / "serve_config.yaml").read_text()
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    (app,) = schema.applications
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(importlib.import_module(module), attr))
    assert load_job(ROOT / app.args["job"]).name  # the job file exists and validates
    graph = build_rag_app(parse_job({"name": "x"}), "model", str(minilm_dir), {})
    assert _deployment_names(graph) == {"RAGIngress", "GeneratorDeployment", "RetrieverDeployment",
                                        "EmbedderDeployment"}
    overridden = {d.name: d for d in app.deployments}
    assert set(overridden) <= _deployment_names(graph)
    # The embedder's user_config is what its reconfigure() validates.
    EmbedderBatching.model_validate(overridden["EmbedderDeployment"].user_config)
    # A whole model's engine is a deployment of its own, named after it (overridable by name).
    graph = build_rag_app(parse_job({"name": "x"}), "model", str(minilm_dir), {}, {"merged/v1": "folder"})
    assert "GeneratorDeployment_merged_v1" in _deployment_names(graph)
