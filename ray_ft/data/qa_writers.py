"""Who writes the QA pairs: one protocol, two engines, both on Ray Data.

- `RayDataVLLMWriter`: the job's base model (or `qa_generation.model`) on vLLM inside Ray Data
  actors, through `ray.data.llm`'s vLLM processor: the vLLM build serving uses (CPU or CUDA),
  each batch decoded together, replies constrained to a JSON schema while decoding.
- `EndpointWriter`: any OpenAI-compatible endpoint, from one Ray Data actor that keeps
  `concurrency` requests in flight under one token-bucket rate limit, re-sending after 429/5xx.

A request is `{"messages", "schema", "max_tokens"}` plus columns the caller wants back; `write`
returns the rows in order, each with its `reply` text ("" when the endpoint gave up on it, with
the reason in `error`).
"""

from __future__ import annotations

import json
import logging
from typing import Protocol

from ray_ft.config import QAGenerationConfig, VLLMConfig
from ray_ft.engine_args import cpu_engine_env, resolve_dtype

log = logging.getLogger(__name__)


class QAWriter(Protocol):
    def write(self, requests: list[dict]) -> list[dict]: ...


def _indexed(requests: list[dict]) -> list[dict]:
    return [{**r, "_row": i} for i, r in enumerate(requests)]


def _in_order(rows: list[dict]) -> list[dict]:
    rows = sorted(rows, key=lambda r: r["_row"])
    for r in rows:
        r.pop("_row")
    return rows


class RayDataVLLMWriter:
    """vLLM engines in Ray Data actors (`ray.data.llm`). Prompts are rendered and tokenized here
    with the model's chat template (the serving code's rendering: no special tokens added twice),
    so the processor runs only the engine stage and needs no extra CPU actors."""

    def __init__(self, model_dir: str, vcfg: VLLMConfig, gen: QAGenerationConfig, system_prompt: str,
                 use_gpu: bool):
        from transformers import AutoTokenizer

        self.model_dir, self.vcfg, self.gen, self.use_gpu = model_dir, vcfg, gen, use_gpu
        self.system_prompt = system_prompt
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def render(self, messages: list[dict]) -> list[int]:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def processor(self):
        from ray.data.llm import build_processor, vLLMEngineProcessorConfig

        v, g = self.vcfg, self.gen
        engine = dict(dtype=resolve_dtype(v, self.use_gpu), enforce_eager=v.enforce_eager,
                      max_model_len=v.max_model_len, max_num_seqs=max(v.max_num_seqs, g.batch_size),
                      enable_prefix_caching=True)
        if self.use_gpu:
            engine["gpu_memory_utilization"] = v.gpu_memory_utilization
            bundle = {"CPU": 1, "GPU": 1}
        else:
            bundle = {"CPU": g.cpus_per_engine}
        config = vLLMEngineProcessorConfig(
            model_source=self.model_dir, engine_kwargs=engine, batch_size=g.batch_size, concurrency=g.concurrency,
            placement_group_config={"bundles": [bundle]},
            runtime_env={"env_vars": {} if self.use_gpu else cpu_engine_env(v)},
            chat_template_stage=False, tokenize_stage=False, detokenize_stage=False)
        return build_processor(config, postprocess=_reply_of)

    def write(self, requests: list[dict]) -> list[dict]:
        import ray

        if not requests:
            return []
        rows = []
        for r in _indexed(requests):
            ids = self.render(r.pop("messages"))
            params = {"temperature": self.gen.temperature, "max_tokens": r.pop("max_tokens"),
                      "structured_outputs": {"json": json.dumps(r.pop("schema"))}}
            rows.append({**r, "prompt": "", "tokenized_prompt": ids, "sampling_params": params})
        ds = ray.data.from_items(rows)
        return _in_order(self.processor()(ds).take_all())


def _reply_of(row: dict) -> dict:
    """Keep the caller's columns and the reply; drop the engine's (token ids, params)."""
    drop = {"prompt", "tokenized_prompt", "sampling_params", "generated_text", "generated_tokens",
            "prompt_token_ids", "num_input_tokens", "num_generated_tokens", "request_id", "batch_uuid",
            "time_taken_llm", "params", "metrics", "embeddings"}
    out = {k: v for k, v in row.items() if k not in drop and not k.startswith("__")}
    out["reply"] = row.get("generated_text") or ""
    out["error"] = ""
    out["generated_tokens"] = int(row.get("num_generated_tokens") or 0)
    return out


class EndpointWriter:
    """An OpenAI-compatible endpoint called from one Ray Data actor (one rate limit for the job)."""

    def __init__(self, gen: QAGenerationConfig):
        if gen.endpoint is None:
            raise ValueError("EndpointWriter needs qa_generation.endpoint")
        self.gen = gen

    def write(self, requests: list[dict]) -> list[dict]:
        import ray

        from ray_ft.data.qa_endpoint import EndpointCaller

        if not requests:
            return []
        rows = [{**r, "messages": json.dumps(r["messages"]), "schema": json.dumps(r["schema"])}
                for r in _indexed(requests)]
        ds = ray.data.from_items(rows).map_batches(
            EndpointCaller, fn_constructor_kwargs={"endpoint": self.gen.endpoint.model_dump(),
                                                   "temperature": self.gen.temperature},
            batch_size=self.gen.batch_size, batch_format="pandas", concurrency=1, num_cpus=0.5)
        return _in_order(ds.take_all())


def writer_for(cfg, model_dir: str | None) -> QAWriter:
    """The engine `data.qa_generation` picks: its endpoint, else vLLM in Ray Data."""
    gen = cfg.data.qa_generation
    if gen.endpoint is not None:
        return EndpointWriter(gen)
    return RayDataVLLMWriter(model_dir, cfg.serve.vllm, gen, cfg.model.system_prompt, cfg.train.use_gpu)
