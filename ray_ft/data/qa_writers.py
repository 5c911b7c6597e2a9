"""Who writes the QA pairs: one protocol, two engines, both in Ray Data actors that run the two
steps (`qa_generation.two_steps`) a batch of nodes at a time.

- `VLLMWriter`: the job's base model (or `qa_generation.model`) on vLLM's offline engine in each
  actor: the vLLM build serving uses (CPU or CUDA), each batch decoded together, replies
  constrained to a JSON schema while decoding. One engine writes a batch's questions and then
  their answers. (`ray.data.llm`'s processor runs one engine pool per processor; the two steps
  as two chained processors started two engines, ~30 s each on CPU, which was half the wall
  time of the shipped corpus: bench/RESULTS.md.)
- `EndpointWriter`: any OpenAI-compatible endpoint, from one Ray Data actor that keeps
  `concurrency` requests in flight under one token-bucket rate limit, re-sending after 429/5xx.

`write(nodes, gen, language)` takes `{node, text}` rows and returns the outcome rows of both steps
(`qa_generation.OUTCOME_COLUMNS`), in any order.
"""

from __future__ import annotations

from typing import Protocol

from ray_ft.config import QAGenerationConfig, VLLMConfig
from ray_ft.data.qa_generation import OUTCOME_COLUMNS, two_steps
from ray_ft.engine_args import cpu_engine_env, resolve_dtype


class QAWriter(Protocol):
    def write(self, nodes: list[dict], gen: QAGenerationConfig, language: str) -> list[dict]: ...


class _TwoStepsActor:
    """A Ray Data actor: both steps for each batch of nodes through `self.complete`."""

    def __init__(self, gen: dict, language: str):
        self.gen, self.language = QAGenerationConfig.model_validate(gen), language

    def complete(self, requests: list[dict]) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch):
        import pandas as pd

        nodes = [{"node": int(i), "text": t} for i, t in zip(batch["node"], batch["text"])]
        return pd.DataFrame(two_steps(nodes, self.complete, self.gen, self.language), columns=list(OUTCOME_COLUMNS))


class VLLMEngineActor(_TwoStepsActor):
    """vLLM's offline engine. Prompts are rendered and tokenized here with the model's chat
    template (the serving code's rendering: no special tokens added twice)."""

    def __init__(self, gen: dict, language: str, model_dir: str, engine: dict, system_prompt: str):
        super().__init__(gen, language)
        from vllm import LLM

        self.llm = LLM(model=model_dir, **engine)
        self.tokenizer = self.llm.get_tokenizer()
        self.system_prompt = system_prompt

    def render(self, messages: list[dict]) -> list[int]:
        if messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def complete(self, requests: list[dict]) -> list[dict]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        prompts = [{"prompt_token_ids": self.render(r["messages"])} for r in requests]
        params = [SamplingParams(temperature=self.gen.temperature, max_tokens=r["max_tokens"],
                                 structured_outputs=StructuredOutputsParams(json=r["schema"])) for r in requests]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        return [{"reply": o.outputs[0].text, "error": "", "generated_tokens": len(o.outputs[0].token_ids)}
                for o in outs]


def _bound_cores(spec: str) -> int:
    """How many cores a VLLM_CPU_OMP_THREADS_BIND list ("0-3", "0,2,4-5") names."""
    n = 0
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class EndpointActor(_TwoStepsActor):
    def __init__(self, gen: dict, language: str):
        super().__init__(gen, language)
        from ray_ft.data.qa_endpoint import EndpointCaller

        self.caller = EndpointCaller(self.gen.endpoint.model_dump(), self.gen.temperature)

    def complete(self, requests: list[dict]) -> list[dict]:
        return self.caller(requests)


def _run(actor: type, nodes: list[dict], gen: QAGenerationConfig, language: str, kwargs: dict, pool: int,
         **resources) -> list[dict]:
    import ray

    if not nodes:
        return []
    ds = ray.data.from_items(nodes).map_batches(
        actor, fn_constructor_kwargs={"gen": gen.model_dump(), "language": language, **kwargs},
        batch_size=gen.batch_size, batch_format="pandas", compute=ray.data.ActorPoolStrategy(size=pool), **resources)
    return ds.take_all()


class VLLMWriter:
    """`gen.concurrency` vLLM engines, one per Ray Data actor (a GPU each on a GPU run)."""

    def __init__(self, model_dir: str, vcfg: VLLMConfig, system_prompt: str, use_gpu: bool):
        self.model_dir, self.vcfg, self.system_prompt, self.use_gpu = model_dir, vcfg, system_prompt, use_gpu

    def engine_kwargs(self, gen: QAGenerationConfig) -> dict:
        v = self.vcfg
        # max_num_seqs: on CPU, 64 made both one-at-a-time and batched decoding ~2x slower than 16
        # (bench/RESULTS.md), so a batch's answers are decoded batch_size at a time
        engine = dict(dtype=resolve_dtype(v, self.use_gpu), enforce_eager=v.enforce_eager,
                      max_model_len=v.max_model_len, enable_prefix_caching=True,
                      max_num_seqs=max(v.max_num_seqs, gen.batch_size))
        if self.use_gpu:
            engine["gpu_memory_utilization"] = v.gpu_memory_utilization
        return engine

    def write(self, nodes: list[dict], gen: QAGenerationConfig, language: str) -> list[dict]:
        kwargs = {"model_dir": self.model_dir, "engine": self.engine_kwargs(gen), "system_prompt": self.system_prompt}
        # The engine core runs in the actor's process: vLLM would spawn one for it, which imports
        # vLLM a second time (~20 s of a CPU start). In-process, vLLM binds no CPU threads, and
        # Ray would give the actor OMP_NUM_THREADS=num_cpus, so the actor's env sets both.
        env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
        if self.use_gpu:
            resources = {"num_gpus": 1}
        else:
            cpu = cpu_engine_env(self.vcfg)
            env |= {**cpu, "OMP_NUM_THREADS": str(_bound_cores(cpu["VLLM_CPU_OMP_THREADS_BIND"]))}
            resources = {"num_cpus": gen.cpus_per_engine}
        resources["runtime_env"] = {"env_vars": env}
        return _run(VLLMEngineActor, nodes, gen, language, kwargs, pool=gen.concurrency, **resources)


class EndpointWriter:
    """An OpenAI-compatible endpoint called from one Ray Data actor (one rate limit for the job)."""

    def write(self, nodes: list[dict], gen: QAGenerationConfig, language: str) -> list[dict]:
        if gen.endpoint is None:
            raise ValueError("EndpointWriter needs qa_generation.endpoint")
        return _run(EndpointActor, nodes, gen, language, {}, pool=1, num_cpus=0.5)


def writer_for(cfg, model_dir: str | None) -> QAWriter:
    """The engine `data.qa_generation` picks: its endpoint, else vLLM in Ray Data."""
    if cfg.data.qa_generation.endpoint is not None:
        return EndpointWriter()
    return VLLMWriter(model_dir, cfg.serve.vllm, cfg.model.system_prompt, cfg.serve_on_gpu)
