"""LoRA SFT of a causal LM on Ray Train.

The driver builds a `TorchTrainer` whose workers read their parquet shard with
`ray.train.get_dataset_shard`, train a peft LoRA adapter (DDP over gloo on CPU, NCCL on GPU), report
metrics every optimizer step and, at the end, a checkpoint holding only the adapter. The same code
runs on a laptop and on a GPU cluster; only `TrainConfig` (workers, use_gpu) differs.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ray.data.collate_fn import NumpyBatchCollateFn

from ray_ft.config import JobConfig, TrainConfig
from ray_ft.data.prepare import PreparedData
from ray_ft.data.tokenize import IGNORE_INDEX
from ray_ft.train import metrics as tm
from ray_ft.train.checkpoints import fit_and_export, ordered_ingest, report_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path
    metrics_file: Path
    history: list[dict]

    # Means over (up to) 8 steps: single batch-1 steps are too noisy to compare.
    @property
    def first_loss(self) -> float:
        return _mean_loss(self.history[:8])

    @property
    def final_loss(self) -> float:
        return _mean_loss(self.history[-8:])


def _mean_loss(rows: list[dict]) -> float:
    return sum(r["loss"] for r in rows) / len(rows)


def pad_collate(batch: dict, pad_id: int):
    """numpy batch of ragged `input_ids`/`labels` -> right-padded torch tensors."""
    import torch

    seqs, labs = batch["input_ids"], batch["labels"]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = np.full((n, width), pad_id, dtype=np.int64)
    labels = np.full((n, width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((n, width), dtype=np.int64)
    for i, (s, lab) in enumerate(zip(seqs, labs)):
        input_ids[i, : len(s)] = s
        labels[i, : len(lab)] = lab
        mask[i, : len(s)] = 1
    return {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "attention_mask": torch.from_numpy(mask),
    }


class PadCollate(NumpyBatchCollateFn):
    """Ray Data collate callable (the class form Ray 2.47+ asks for) around `pad_collate`."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, batch: dict):
        return pad_collate(batch, self.pad_id)


def lora_target_modules(spec: str) -> str | list[str]:
    return "all-linear" if spec == "all" else [m.strip() for m in spec.split(",") if m.strip()]


def build_lora_model(model_dir: str, tcfg: TrainConfig, dtype):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(tcfg.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    num_params = sum(p.numel() for p in base.parameters())
    lcfg = LoraConfig(
        r=tcfg.lora_rank, lora_alpha=tcfg.lora_alpha, lora_dropout=tcfg.lora_dropout,
        target_modules=lora_target_modules(tcfg.lora_target), task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lcfg), num_params


def steps_per_epoch(examples_per_worker: int, tcfg: TrainConfig) -> int:
    micro = math.ceil(examples_per_worker / tcfg.per_device_train_batch_size)
    return max(1, math.ceil(micro / tcfg.gradient_accumulation_steps))


def total_steps(examples_per_worker: int, tcfg: TrainConfig) -> int:
    if tcfg.max_steps is not None:
        return tcfg.max_steps
    return max(1, math.ceil(steps_per_epoch(examples_per_worker, tcfg) * tcfg.num_train_epochs))


def _new_accumulator() -> dict:
    """Sums over the micro-batches of one optimizer step."""
    return {"loss": 0.0, "tokens": 0, "slots": 0}


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on each Ray Train worker. `loop_config` is Ray's transport; it is re-validated at once."""
    import ray.train
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    job = JobConfig.model_validate(loop_config["job"])
    tcfg = job.train
    model_dir: str = loop_config["model_dir"]
    examples_per_worker: int = loop_config["examples_per_worker"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not tcfg.use_gpu:
        torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    dtype = torch.bfloat16 if tcfg.use_gpu else torch.float32

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model, num_params = build_lora_model(model_dir, tcfg, dtype)
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=tcfg.learning_rate, weight_decay=tcfg.weight_decay)
    n_steps = total_steps(examples_per_worker, tcfg)
    sched = get_scheduler(tcfg.lr_scheduler_type, optim, math.ceil(tcfg.warmup_ratio * n_steps), n_steps)
    device = ray.train.torch.get_device()
    fpt = tm.flops_per_token(num_params, tcfg.finetuning_type)
    peak = tm.peak_tflops(tcfg.use_gpu)

    shard = ray.train.get_dataset_shard("train")
    history: list[dict] = []
    step, micro, t0 = 0, 0, time.perf_counter()
    acc = _new_accumulator()
    model.train()
    while step < n_steps:
        micro_at_epoch_start = micro
        for batch in shard.iter_torch_batches(
            batch_size=tcfg.per_device_train_batch_size,
            collate_fn=PadCollate(pad_id),
            local_shuffle_buffer_size=None,
        ):
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            (out.loss / tcfg.gradient_accumulation_steps).backward()
            acc["loss"] += out.loss.item() / tcfg.gradient_accumulation_steps
            acc["tokens"] += int(batch["attention_mask"].sum())
            acc["slots"] += batch["attention_mask"].numel()
            micro += 1
            if micro % tcfg.gradient_accumulation_steps:
                continue
            grad_norm = torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            totals = torch.tensor([acc["loss"], acc["tokens"], acc["slots"]], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(totals)
            loss = totals[0].item() / world
            tokens_per_s = totals[1].item() / dt
            achieved = tokens_per_s * fpt / 1e12
            row = {
                "step": step, "epoch": round(step / steps_per_epoch(examples_per_worker, tcfg), 3),
                "loss": loss, "lr": sched.get_last_lr()[0], "grad_norm": float(grad_norm),
                "tokens_per_s": tokens_per_s, "tflops": achieved,
                "mfu": (achieved / (peak * world)) if peak else None,
                "padding_ratio": 1.0 - totals[1].item() / totals[2].item(),
                "peak_mem_mb": tm.peak_memory_mb(tcfg.use_gpu), "step_time_s": dt,
            }
            history.append(row)
            if rank == 0 and (step % tcfg.log_every_n_steps == 0 or step == n_steps):
                # A logger, not print: Ray Train 2.60 tees a patched print to stdout and to its
                # logger when stdout is wrapped, which printed every line twice.
                log.info("[train] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if step == n_steps:
                report_checkpoint(history, rank, lambda folder: _save_adapter(model, tok, folder))
                break
            ray.train.report(row)
            acc = _new_accumulator()
            t0 = time.perf_counter()
        if micro == micro_at_epoch_start:
            raise RuntimeError(f"worker {rank} got no training rows from its dataset shard")


def _save_adapter(model, tok, folder: Path) -> None:
    inner = model.module if hasattr(model, "module") else model
    inner.save_pretrained(folder)  # peft saves adapter weights + adapter_config.json only
    tok.save_pretrained(folder)


def run_training(cfg: JobConfig, prepared: PreparedData, model_dir: Path, out_dir: Path) -> TrainResult:
    """Fit the adapter on Ray Train; copy it to `out_dir/adapter` and the metrics to metrics.jsonl."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tcfg = cfg.train
    manifest = prepared.manifest()
    examples_per_worker = manifest["train_examples"] // tcfg.num_workers
    if examples_per_worker == 0:
        raise ValueError(f"{manifest['train_examples']} examples cannot feed {tcfg.num_workers} workers")
    train_ds = ray.data.read_parquet(str(prepared.train_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(), "model_dir": str(model_dir),
            "examples_per_worker": examples_per_worker,
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker} if not tcfg.use_gpu else None,
        ),
        run_config=RunConfig(name=f"sft_{time.strftime('%Y%m%d_%H%M%S')}",
                             storage_path=str((out_dir / "ray").resolve())),
        datasets={"train": train_ds},
        dataset_config=ordered_ingest(),
    )
    adapter_dir, history, _ = fit_and_export(trainer, out_dir, "adapter")
    metrics_file = out_dir / "metrics.jsonl"
    return TrainResult(adapter_dir, metrics_file, history)
