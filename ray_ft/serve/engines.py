"""The generator engine behind its protocol: vLLM (CPU or CUDA build). The sentence-transformers
embedder is `ray_ft.embedder` (shared with data and training), the knowledge base `ray_ft.kb`.
None of them knows about Ray Serve."""

from __future__ import annotations

import os
import re
import uuid


from ray_ft.config import VLLMConfig
from ray_ft.engine_args import cpu_engine_env, resolve_dtype
from ray_ft.errors import RayFTError
from ray_ft.serve.adapter_registry import AdapterRegistry
from ray_ft.serve.adapters import fetch_adapter
from ray_ft.serve.protocols import Completion


class UnknownModelError(RayFTError):
    """The request named a model that is neither the base nor a loaded adapter."""


class InvalidStructuredOutput(RayFTError):
    """The request's `response_format` schema cannot be compiled into a decoding constraint."""


class PromptTooLong(RayFTError):
    """The rendered prompt plus max_tokens does not fit in the engine's max_model_len."""


class InvalidMessages(RayFTError):
    """The engine refused the request's content: the chat template rejected the messages (e.g.
    roles that do not alternate), or vLLM reported a client error."""


class VLLMGenerator:
    """Async vLLM engine serving a base model and LoRA adapters (unmerged, chosen per request).

    The engine core runs in a process vLLM spawns; on CPU its KV cache is sized by
    `kv_cache_space_gb` (the default would take most of the machine's memory).
    """

    def __init__(self, model_dir: str, base_name: str, adapters: dict[str, str], vcfg: VLLMConfig,
                 system_prompt: str, use_gpu: bool, registry: str | None = None, live_max_loras: int = 4):
        """`registry`: the live adapters' file (`serve.live_adapters`); a name asked for that is
        neither the base nor in `adapters` is looked up there, and vLLM loads it on first use."""
        if not use_gpu:
            os.environ.update(cpu_engine_env(vcfg))
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.lora.request import LoRARequest
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=model_dir, dtype=resolve_dtype(vcfg, use_gpu), enforce_eager=vcfg.enforce_eager,
            max_model_len=vcfg.max_model_len, max_num_seqs=vcfg.max_num_seqs,
            enable_lora=bool(adapters) or registry is not None, max_lora_rank=vcfg.max_lora_rank,
            max_loras=max(1, len(adapters)) if registry is None else max(len(adapters), live_max_loras),
            enable_prefix_caching=True,
            **({"gpu_memory_utilization": vcfg.gpu_memory_utilization} if use_gpu else {}),
        )
        self.engine = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.base_name = base_name
        self.system_prompt = system_prompt
        self.max_model_len = vcfg.max_model_len
        self.loras = {
            # Remote adapters (s3://, gs://) are fetched into the local cache of this node.
            name: LoRARequest(name, i + 1, fetch_adapter(str(path))) for i, (name, path) in enumerate(adapters.items())
        }
        self.registry = AdapterRegistry(registry) if registry else None
        self.live: dict[str, str] = {}  # live adapter -> the location its LoRARequest was made from
        self._next_id = len(adapters) + 1

    def _sync_live(self) -> None:
        """Follow the registry: new names get a LoRARequest (vLLM loads the weights on first
        use), removed or re-pointed ones lose theirs."""
        if self.registry is None:
            return
        from vllm.lora.request import LoRARequest

        registered = self.registry.read()
        for name in [n for n, loc in self.live.items() if registered.get(n) != loc]:
            del self.loras[name], self.live[name]
        for name, location in registered.items():
            if name not in self.loras and name != self.base_name:
                self.loras[name] = LoRARequest(name, self._next_id, fetch_adapter(location))
                self.live[name], self._next_id = location, self._next_id + 1

    def model_names(self) -> list[str]:
        self._sync_live()
        return [self.base_name, *self.loras]

    def render(self, messages: list[dict]) -> str:
        if not messages or messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        from jinja2 import TemplateError

        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as err:  # templates reject what they cannot render (raise_exception)
            raise InvalidMessages(f"messages: the model's chat template refused them: {err}") from None

    async def generate(self, messages: list[dict], model: str, max_tokens: int,
                       temperature: float, structured: dict | None = None,
                       sampling: dict | None = None) -> Completion:
        """`structured` ({"json": schema} or {"json_object": True}) constrains decoding to JSON;
        `sampling`: more SamplingParams (top_p, stop, seed)."""
        from vllm.sampling_params import RequestOutputKind

        final = None
        async for out in self._run(messages, model, max_tokens, temperature, structured, sampling,
                                   RequestOutputKind.FINAL_ONLY):
            final = out
        choice = final.outputs[0]
        return Completion(choice.text, model, len(final.prompt_token_ids), len(choice.token_ids),
                          choice.finish_reason)

    async def stream(self, messages: list[dict], model: str, max_tokens: int, temperature: float,
                     structured: dict | None = None, sampling: dict | None = None):
        """Yield Completions whose `text` is the new text since the previous one (token counts
        so far; `finish_reason` on the last). Bad requests raise before the first yield."""
        from vllm.sampling_params import RequestOutputKind

        generated = 0
        async for out in self._run(messages, model, max_tokens, temperature, structured, sampling,
                                   RequestOutputKind.DELTA):
            choice = out.outputs[0]
            generated += len(choice.token_ids)
            yield Completion(choice.text, model, len(out.prompt_token_ids), generated, choice.finish_reason)

    async def _run(self, messages, model, max_tokens, temperature, structured, sampling, output_kind):
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        if model != self.base_name and (model not in self.loras or model in self.live):
            self._sync_live()  # a stat of the registry file: a removed live adapter is gone at once
        if model != self.base_name and model not in self.loras:
            raise UnknownModelError(f"unknown model '{model}'; served: {', '.join(self.model_names())}")
        from vllm.exceptions import VLLMClientError

        # Token ids, not text: vLLM would tokenize a text prompt with the special tokens added,
        # and a template that already starts with BOS (Llama 3, Gemma, Mistral) would get two;
        # training tokenizes the rendered template without them.
        prompt_ids = self.tokenizer(self.render(messages), add_special_tokens=False)["input_ids"]
        # Checked here, not left to the engine: vLLM would silently shorten the completion when
        # prompt + max_tokens passes max_model_len, and its error for a too-long prompt is a 500.
        n_prompt = len(prompt_ids)
        if n_prompt + max_tokens > self.max_model_len:
            raise PromptTooLong(f"the prompt is {n_prompt} tokens; with max_tokens={max_tokens} it exceeds "
                                f"the model's context of {self.max_model_len} tokens")
        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, output_kind=output_kind,
            structured_outputs=StructuredOutputsParams(**structured) if structured else None, **(sampling or {}))
        try:
            async for out in self.engine.generate({"prompt_token_ids": prompt_ids}, params,
                                                  request_id=uuid.uuid4().hex,
                                                  lora_request=self.loras.get(model)):
                yield out
        except (ValueError, VLLMClientError) as err:  # vLLM validates the request when it is added
            # Schema problems become a response_format error; vLLM's other client errors are the
            # request's fault too (4xx); any other ValueError stays itself (a 500).
            if structured and re.search(r"schema|grammar|json|structured", str(err), re.IGNORECASE):
                raise InvalidStructuredOutput(f"response_format: {err}") from None
            if isinstance(err, VLLMClientError):
                raise InvalidMessages(str(err)) from None
            raise

    async def check_health(self) -> None:
        """Raises when the engine core process has died (Serve then replaces the replica)."""
        await self.engine.check_health()

    def shutdown(self) -> None:
        self.engine.shutdown()
