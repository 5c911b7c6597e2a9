"""Serve application builder for `serve run`, `serve deploy` and KubeRay's RayService.

    serve run ray_ft.serve.entry:app_builder job=jobs/cmrc_lora_gpu.yaml

builds the same RAG graph `ray-ft run` deploys, from a job whose data stage (knowledge base) and,
when "finetuned" is among `eval.models`, train stage (adapter) have already run: the run folder
(`output_dir/name`) must be readable by the Serve replicas (shared storage on a cluster).
"""

from __future__ import annotations

from pathlib import Path

from ray_ft.config import load_job
from ray_ft.data.prepare import PreparedData, load_knowledge_base
from ray_ft.errors import RayFTError
from ray_ft.models import resolve_model


def app_builder(args: dict):
    """Serve's application-builder hook: `args` holds `job` (path of the YAML job file)."""
    from ray_ft.pipeline import check_extra_adapters, check_servable, trained_adapter
    from ray_ft.serve.app import build_rag_app

    if "job" not in args:
        raise RayFTError("ray_ft.serve.entry:app_builder needs the argument job=PATH_TO_JOB.yaml")
    cfg = load_job(args["job"])
    check_servable(cfg)
    check_extra_adapters(cfg)
    prepared = PreparedData(cfg.run_dir / "data")
    if not prepared.knowledge_base_file.is_file():
        raise RayFTError(f"{prepared.knowledge_base_file}: no knowledge base; run `ray-ft prepare {args['job']}` first")
    adapters = {}
    adapter = trained_adapter(cfg)
    if adapter is not None:
        adapters[cfg.name] = str(adapter.resolve())
    adapters.update({label: str(Path(path).resolve()) for label, path in cfg.eval.adapters.items()})
    return build_rag_app(cfg, str(resolve_model(cfg.model.name)), str(resolve_model(cfg.serve.embedder)),
                         adapters, load_knowledge_base(prepared))
