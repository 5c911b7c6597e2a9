"""What a job serves, by served name: the base, the fine-tuned model (a LoRA adapter unmerged on
the base engine, or merged into a whole model of its own), `eval.adapters` and `serve.models`;
and how each one is described in the report. Used by `ray-ft run`/`eval` and by `ray-ft serve`.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.errors import RayFTError
from ray_ft.io import write_text_atomic
from ray_ft.models import resolve_model

log = logging.getLogger(__name__)


def served_models(cfg: JobConfig, trained: str | Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """({served name: adapter location}, {served name: whole-model folder}). The trained model,
    under the job's name, is an adapter of the base engine (a LoRA adapter folder or prefix) or a
    whole model on an engine of its own (freeze/full); then `eval.adapters` and `serve.models`.
    Adapter locations may be object-storage URIs; the engine fetches them where it runs."""
    from ray_ft.serve.adapters import adapter_location, has_adapter

    adapters, whole = {}, {}
    if trained and has_adapter(trained):
        if finetuned_served_as(cfg) == "merged":
            whole[cfg.name] = str(merged_for_serving(cfg, adapter_location(trained)))
        else:
            adapters[cfg.name] = adapter_location(trained)
    elif trained:
        whole[cfg.name] = str(Path(trained).resolve())
    adapters.update({label: adapter_location(path) for label, path in cfg.eval.adapters.items()})
    whole.update({label: str(resolve_model(path)) for label, path in cfg.serve.models.items()})
    return adapters, whole


def finetuned_served_as(cfg: JobConfig) -> str:
    """"merged" or "unmerged": how the fine-tuned adapter is served (`serve.finetuned_adapter`;
    auto: merged on CPU, unmerged on GPU)."""
    mode = cfg.serve.finetuned_adapter
    return ("unmerged" if cfg.serve_on_gpu else "merged") if mode == "auto" else mode


def merged_for_serving(cfg: JobConfig, adapter: str) -> Path:
    """The base with `adapter` merged in, at run_dir/serve/merged; merged again only when the
    adapter's files or the base model changed (a stamp of both is kept beside it)."""
    from ray_ft.data.sources import folder_fingerprint
    from ray_ft.serve.adapters import fetch_adapter
    from ray_ft.train.methods import merge_adapter

    local = Path(fetch_adapter(adapter))
    base = resolve_model(cfg.model.name)
    out = cfg.run_dir / "serve" / "merged"
    stamp = out.parent / "merged.stamp"
    want = hashlib.sha256(folder_fingerprint(str(local)) + b"\0" + folder_fingerprint(str(base))).hexdigest()
    if (out / "config.json").is_file() and stamp.is_file() and stamp.read_text() == want:
        return out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    merge_adapter(base, local, out)
    write_text_atomic(stamp, want)
    log.info("merged %s into %s for serving (%.1fs)", local, out, time.perf_counter() - t)
    return out.resolve()


def served_descriptions(cfg: JobConfig, trained_kind: str | None) -> dict[str, str]:
    """How each served label runs, for the report. `trained_kind`: "adapter" or "model" (what the
    fine-tuned folder holds), None when no fine-tuned model is served."""
    device = "GPU" if cfg.serve_on_gpu else "CPU"
    out = {"base": f"vLLM ({device})"}
    if trained_kind == "adapter":
        out["finetuned"] = ("LoRA adapter merged into the base weights, on an engine of its own"
                            if finetuned_served_as(cfg) == "merged" else
                            "LoRA adapter, unmerged, on the base engine") + f" (vLLM, {device})"
    elif trained_kind == "model":
        out["finetuned"] = f"whole fine-tuned model on an engine of its own (vLLM, {device})"
    out.update({label: f"LoRA adapter, unmerged, on the base engine (vLLM, {device})" for label in cfg.eval.adapters})
    out.update({label: f"whole model on an engine of its own (vLLM, {device})" for label in cfg.serve.models})
    return out


def trained_model(cfg: JobConfig) -> str | None:
    """What `ray-ft eval`/`serve` serve as "finetuned": eval.adapter (a folder or an
    object-storage URI), else the run's own adapter (lora) or whole model (freeze/full)."""
    from ray_ft.serve.adapters import check_adapter

    if "finetuned" not in cfg.eval.models:
        return None
    hint = "; run `ray-ft train JOB.yaml` first or set eval.adapter"
    if cfg.eval.adapter or cfg.train.finetuning_type == "lora":
        return check_adapter(cfg.eval.adapter or str(cfg.run_dir / "train" / "adapter"), "", hint)
    model = cfg.run_dir / "train" / "model"
    if not (model / "config.json").is_file():
        raise RayFTError(f"{model}: no fine-tuned model here (config.json missing){hint}")
    return str(model)


def check_extra_models(cfg: JobConfig) -> None:
    """eval.adapters and serve.models exist (before hours of training, not after)."""
    from ray_ft.serve.adapters import check_adapter

    for label, path in cfg.eval.adapters.items():
        check_adapter(path, f"eval.adapters.{label}: ")
    for label, name in cfg.serve.models.items():
        try:
            resolve_model(name)
        except RayFTError as err:
            raise RayFTError(f"serve.models.{label}: {err}") from None


def served_reranker(cfg: JobConfig) -> str | None:
    """The cross-encoder folder the graph reranks with (serve.rerank), None without reranking.
    The job's own must have been trained: a missing one is an error, not a silent first stage."""
    name = cfg.served_reranker
    if name is None:
        return None
    if name == cfg.finetuned_reranker_dir and not (Path(name) / "config.json").is_file():
        raise RayFTError(f"serve.rerank: the job's reranker {name} is not trained yet: run `ray-ft run` "
                         "(rerank.enabled) or `ray-ft train` on a task: rerank job first, or set serve.rerank.model")
    return str(resolve_model(name))
