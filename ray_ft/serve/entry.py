"""Serve application builder for `serve run`, `serve deploy` and KubeRay's RayService.

    serve run ray_ft.serve.entry:app_builder job=jobs/cmrc_lora.yaml

(or `ray-ft serve JOB.yaml`, which also starts a local Ray cluster when the job names none)
builds the same RAG graph `ray-ft run` deploys, from a job whose data stage (knowledge base) and,
when "finetuned" is among `eval.models`, train stage (adapter, or whole model) have already run: the run folder
(`output_dir/name`) must be readable by the Serve replicas (shared storage on a cluster).
"""

from __future__ import annotations

from ray_ft.config import load_job
from ray_ft.data.prepare import PreparedData, load_knowledge_base
from ray_ft.errors import RayFTError
from ray_ft.models import resolve_model


def served_inputs(cfg, job: str) -> dict:
    """What the graph of a finished run serves: model and embedder folders, adapters by served
    name, knowledge-base documents (the keyword arguments of `build_rag_app` / `deploy`). Fails
    with a message naming the missing piece and the command that makes it."""
    from ray_ft.served import check_extra_models, served_models, served_reranker, trained_model

    check_extra_models(cfg)
    prepared = PreparedData(cfg.run_dir / "data")
    if not prepared.knowledge_base_file.is_file():
        raise RayFTError(f"{prepared.knowledge_base_file}: no knowledge base; run `ray-ft prepare {job}` first")
    adapters, whole = served_models(cfg, trained_model(cfg))
    return {"model_dir": str(resolve_model(cfg.model.name)), "embedder_dir": str(resolve_model(cfg.serve.embedder)),
            "adapters": adapters, "documents": load_knowledge_base(prepared), "whole_models": whole,
            "reranker_dir": served_reranker(cfg)}


def app_builder(args: dict):
    """Serve's application-builder hook: `args` holds `job` (path of the YAML job file); every
    other argument is a config override (`serve run ray_ft.serve.entry:app_builder job=J.yaml
    serve.retrieval.top_k=5`)."""
    from ray_ft.kb.build import check_job_knowledge_base
    from ray_ft.serve.app import build_rag_app

    if "job" not in args:
        raise RayFTError("ray_ft.serve.entry:app_builder needs the argument job=PATH_TO_JOB.yaml")
    cfg = load_job(args["job"], [f"{k}={v}" for k, v in args.items() if k != "job"])
    inputs = served_inputs(cfg, args["job"])
    # The builder only binds the graph (Serve runs it in its controller): the table is built
    # beforehand, by `ray-ft kb build` (`ray-ft serve` and `ray-ft run` build it themselves).
    check_job_knowledge_base(cfg, inputs.pop("documents"), inputs["embedder_dir"], args["job"])
    return build_rag_app(cfg, **inputs)


def serve_until_stopped(cfg, job: str, announce=print) -> None:
    """`ray-ft serve`: deploy the graph of a finished run and serve until SIGINT/SIGTERM, then
    shut down gracefully: the proxy stops taking requests and each replica gets its
    `graceful_shutdown_timeout_s` to finish the ones it holds."""
    import signal
    import threading

    from ray_ft.pipeline import init_ray
    from ray_ft.serve.app import deploy, stop_serving

    inputs = served_inputs(cfg, job)  # fail before starting anything
    # ray.init installs Ray's own SIGTERM handler in the driver (it exits at once, no drain), so
    # ours go in after it: SIGTERM (Kubernetes, KubeRay, systemd) drains like Ctrl-C.
    init_ray(cfg)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        url = deploy(cfg, **inputs)
        models = [cfg.model.name, *inputs["adapters"], *inputs["whole_models"]]
        announce(f"serving {url} (models: {', '.join(models)}; {len(inputs['documents'])} documents); "
                 "Ctrl-C stops")
        stop.wait()
        announce("stopping: finishing requests in flight")
        stop_serving(cfg)
        announce("stopped")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
