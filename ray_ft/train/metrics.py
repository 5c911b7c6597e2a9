"""Throughput and utilisation numbers logged every training step.

FLOP convention (per trained token, N = all parameters of the base model, embeddings included):
full fine-tuning 6N (forward 2N + backward 4N); LoRA and freeze 4N, because frozen weights need no
weight gradient (forward 2N + input gradients 2N). Attention's sequence-length term is left out,
as in the PaLM appendix's 6N convention, so MFU is slightly understated on long sequences.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak TFLOP/s by device-name substring (datasheet numbers, no sparsity).
GPU_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def sum_over_ranks(values: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor summed over the training ranks (itself on one rank). NCCL reduces CUDA
    tensors only and gloo CPU ones, so it travels on the training device."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    on_device = values.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def flops_per_token(num_params: int, finetuning_type: str) -> float:
    return (6.0 if finetuning_type == "full" else 4.0) * num_params


def peak_tflops(use_gpu: bool) -> float | None:
    """Datasheet peak of the device, or None where it is not known (CPUs)."""
    if not use_gpu or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, value in GPU_PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def peak_memory_mb(use_gpu: bool) -> float:
    """Peak device memory on GPU; peak resident set size of the process on CPU."""
    if use_gpu and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 if sys.platform != "darwin" else rss / 2**20
