"""vLLM settings shared by serving (Ray Serve) and batch generation (Ray Data): one dtype rule
and one CPU environment, so both run the engine the same way."""

from __future__ import annotations

import os

from ray_ft.config import VLLMConfig
from ray_ft.devices import cpu_has_native_bf16


def resolve_dtype(vcfg: VLLMConfig, use_gpu: bool) -> str:
    """"auto": bf16 on GPU and on CPUs with native bf16 (measured faster than fp32 there, base and
    LoRA: bench/vllm_cpu_lora.py); fp32 on other CPUs, where bf16 is emulated."""
    if vcfg.dtype != "auto":
        return vcfg.dtype
    return "bfloat16" if use_gpu or cpu_has_native_bf16() else "float32"


def cpu_engine_env(vcfg: VLLMConfig) -> dict[str, str]:
    """Environment of a CPU engine: its KV cache sized by `kv_cache_space_gb` (the default would
    take most of the machine's memory), and every core bound (vLLM's "auto" binding keeps one in
    reserve, which halves throughput on a 2-core machine)."""
    n = os.cpu_count() or 1
    return {"VLLM_CPU_KVCACHE_SPACE": str(vcfg.kv_cache_space_gb),
            "VLLM_CPU_OMP_THREADS_BIND": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", f"0-{n - 1}" if n > 1 else "0")}
