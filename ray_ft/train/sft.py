"""Supervised fine-tuning of a causal LM on Ray Train: LoRA, freeze or full; DDP or DeepSpeed ZeRO.

Each Ray Train worker reads its parquet shard (`ray.train.get_dataset_shard`), padded examples or
packed rows, and trains through a stepper (`ray_ft.train.steppers`: plain PyTorch/DDP or
DeepSpeed ZeRO-2/3). Every `eval_every_n_steps` and at the end it validates (loss + greedy-answer
metrics on the dev split) and reports a checkpoint; Ray Train keeps the best ones by
`metric_for_best`, and that best one is exported. With `FailureConfig`, a dead worker makes Ray
Train restart the group from the latest checkpoint: weights, optimizer, scheduler, step, history
and the position in the data are restored. The same code runs on a laptop and on a GPU cluster.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from ray_ft.config import JobConfig, TrainConfig
from ray_ft.data.prepare import PreparedData
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl
from ray_ft.train import metrics as tm
from ray_ft.train.batches import PadCollate, answer_tokens, flattens, model_inputs
from ray_ft.train.checkpoints import (
    HISTORY_FILE, fit_and_export, ordered_ingest, prune_superseded_runs, report_checkpoint,
    resumable_run_name,
)
from ray_ft.train.methods import build_model, load_trained_weights, merge_adapter, save_export
from ray_ft.train.steppers import make_stepper, weights_dtype

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path  # lora: the adapter; freeze/full: the whole model folder
    metrics_file: Path
    history: list[dict]
    exported_step: int | None = None
    merged_dir: Path | None = None

    # Means over (up to) 8 steps: single batch-1 steps are too noisy to compare.
    @property
    def first_loss(self) -> float:
        return _mean_loss(self.history[:8])

    @property
    def final_loss(self) -> float:
        return _mean_loss(self.history[-8:])


def _mean_loss(rows: list[dict]) -> float:
    return sum(r["loss"] for r in rows) / len(rows)


def micro_batches_per_epoch(rows_per_worker: int, tcfg: TrainConfig) -> int:
    return -(-rows_per_worker // tcfg.per_device_train_batch_size)


def steps_per_epoch(rows_per_worker: int, tcfg: TrainConfig) -> int:
    """Optimizer steps per epoch: full accumulation groups only (a partial group at the end of an
    epoch is left out, so every step averages the same number of micro-batches)."""
    micro = micro_batches_per_epoch(rows_per_worker, tcfg)
    if micro < tcfg.gradient_accumulation_steps:
        raise RayFTError(f"train.gradient_accumulation_steps: {rows_per_worker} rows per worker make "
                         f"{micro} micro-batches, fewer than gradient_accumulation_steps={tcfg.gradient_accumulation_steps}")
    return micro // tcfg.gradient_accumulation_steps


def total_steps(rows_per_worker: int, tcfg: TrainConfig) -> int:
    if tcfg.max_steps is not None:
        return tcfg.max_steps
    return max(1, round(steps_per_epoch(rows_per_worker, tcfg) * tcfg.num_train_epochs))


def _step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout randomness of a step from (seed, rank, step): a resumed run draws the same."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**31)


def _is_better(metric: str, value: float, best: float | None) -> bool:
    return best is None or (value < best if metric == "val_loss" else value > best)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on each Ray Train worker. `loop_config` is Ray's transport; it is re-validated at once."""
    import ray.train
    import torch
    from transformers import AutoTokenizer

    from ray_ft.train.validation import validate

    job = JobConfig.model_validate(loop_config["job"])
    tcfg = job.train
    model_dir: str = loop_config["model_dir"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not tcfg.use_gpu:
        torch.set_num_threads(max(1, int(tcfg.cpus_per_worker)))
    dtype = weights_dtype(tcfg)

    tok = AutoTokenizer.from_pretrained(model_dir)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    model, num_params = build_model(model_dir, tcfg, dtype, packed=loop_config["packed"])
    attention = model.config._attn_implementation
    flatten = loop_config["packed"] and flattens(attention)
    if rank == 0:
        log.info("[train] %s rows, attention: %s", "packed" if loop_config["packed"] else "padded", attention
                 + (" (a batch of packed rows is flattened into one row)" if flatten else ""))
    rows_per_worker = loop_config["rows_per_worker"]
    n_steps, per_epoch = total_steps(rows_per_worker, tcfg), steps_per_epoch(rows_per_worker, tcfg)
    step, history, best, since_best, stop = 0, [], None, 0, False
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:  # a restart after a failure: weights first, before any wrapping
        with ckpt.as_directory() as d:
            load_trained_weights(model, Path(d) / "export", tcfg.finetuning_type)
    stepper = make_stepper(model, tcfg, n_steps, world)
    resumed_from = None
    if ckpt is not None:
        with ckpt.as_directory() as d:
            stepper.load_state(Path(d))
            state = json.loads(Path(d, "loop_state.json").read_text())
            history = read_jsonl(Path(d, HISTORY_FILE))
        step, best, since_best = state["step"], state["best"], state["since_best"]
        resumed_from = step
        stop = bool(tcfg.early_stopping_patience and since_best >= tcfg.early_stopping_patience)
        if rank == 0:
            log.info("[train] resumed from %s at step %d", ckpt.path, step)
    device = ray.train.torch.get_device()
    fpt = tm.flops_per_token(num_params, tcfg.finetuning_type)
    peak = tm.peak_tflops(tcfg.use_gpu)
    writer = _tensorboard(loop_config, rank)
    val_rows = loop_config.get("val_rows") or []
    metric = tcfg.metric_for_best

    def save(folder: Path) -> None:
        """Rank 0's part of a checkpoint: the export form of the weights and the loop state."""
        trainable = [p for p in stepper.module.parameters() if p.requires_grad] \
            if tcfg.finetuning_type == "lora" else list(stepper.module.parameters())
        with stepper.gathered(trainable):
            if rank == 0:
                save_export(stepper.module, tok, folder / "export", tcfg.finetuning_type)
        if rank == 0:
            (folder / "loop_state.json").write_text(json.dumps({"step": step, "best": best, "since_best": since_best}))

    shard = ray.train.get_dataset_shard("train")
    stepper.train(True)
    t0, tokens, slots, loss_sum, waited, examples = time.perf_counter(), 0, 0, 0.0, 0.0, 0
    examples_seen = history[-1].get("examples_seen", 0) if history else 0
    while step < n_steps and not stop:
        skip = (step % per_epoch) * tcfg.gradient_accumulation_steps  # micro-batches a resumed run did
        seen, group, t_ask = 0, [], time.perf_counter()
        for micro, batch in enumerate(shard.iter_torch_batches(
                batch_size=tcfg.per_device_train_batch_size, collate_fn=PadCollate(pad_id, flatten),
                local_shuffle_buffer_size=None)):
            waited += time.perf_counter() - t_ask  # time blocked on the data pipeline
            seen += 1
            if micro < skip:
                continue
            if micro >= per_epoch * tcfg.gradient_accumulation_steps:
                break  # the partial accumulation group at the epoch's end
            group.append(batch)
            if len(group) < tcfg.gradient_accumulation_steps:
                t_ask = time.perf_counter()
                continue
            torch.manual_seed(_step_seed(tcfg.seed, rank, step))
            # The step's loss is the mean over every answer token of the whole group on every
            # rank (as one big batch would give), not a mean of per-micro-batch means.
            per_rank = tm.sum_over_ranks(torch.tensor(float(sum(answer_tokens(b) for b in group)),
                                                      dtype=torch.float64), device).float() / world
            for i, micro_batch in enumerate(group):
                loss = stepper.forward(model_inputs(micro_batch, device) | {"num_items_in_batch": per_rank})
                stepper.backward(loss, boundary=i == len(group) - 1)
                if i < len(group) - 1 and tcfg.deepspeed.stage:
                    stepper.micro_step()
                loss_sum += loss.item()
                tokens += int(micro_batch["num_real_tokens"])
                examples += int(micro_batch["num_examples"])
                slots += micro_batch["input_ids"].numel()
            group = []
            grad_norm = stepper.step()
            step += 1
            dt = time.perf_counter() - t0
            totals = tm.sum_over_ranks(torch.tensor([loss_sum, tokens, slots, examples], dtype=torch.float64), device)
            tokens_per_s = totals[1].item() / dt
            examples_seen += int(totals[3].item())
            achieved = tokens_per_s * fpt / 1e12
            row = {
                "step": step, "epoch": round(step / per_epoch, 3), "examples_seen": examples_seen,
                "loss": totals[0].item() / world,
                "lr": stepper.lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "tflops": achieved,
                "mfu": (achieved / (peak * world)) if peak else None,
                "padding_ratio": 1.0 - totals[1].item() / totals[2].item(),
                "peak_mem_mb": tm.peak_memory_mb(tcfg.use_gpu), "step_time_s": dt, "data_wait_s": waited,
            }
            if resumed_from is not None:
                row["resumed_from_step"], resumed_from = resumed_from, None
            evaluate = step == n_steps or bool(tcfg.eval_every_n_steps and step % tcfg.eval_every_n_steps == 0)
            if evaluate and val_rows:
                t_val = time.perf_counter()
                row.update(validate(stepper, tok, val_rows, tcfg, rank, world, device))
                row["val_s"] = time.perf_counter() - t_val
                if _is_better(metric, row[metric], best):
                    best, since_best = row[metric], 0
                else:
                    since_best += 1
                stop = bool(tcfg.early_stopping_patience and since_best >= tcfg.early_stopping_patience)
                row["early_stop"] = stop
            history.append(row)
            if rank == 0 and (step % tcfg.log_every_n_steps == 0 or evaluate):
                _log_row(row, n_steps, writer)
            _maybe_kill(loop_config, step, rank)
            if evaluate or stop:
                # Every rank reports: DeepSpeed's shards come from all of them; Ray Train merges the
                # files into one checkpoint folder and keeps the best by metric_for_best.
                report_checkpoint(history, rank, lambda folder: (save(folder), stepper.save_state(folder, rank)),
                                  all_ranks_save=bool(tcfg.deepspeed.stage))
            if step == n_steps or stop:
                break
            t0, tokens, slots, loss_sum, waited, examples = time.perf_counter(), 0, 0, 0.0, 0.0, 0
            t_ask = t0
        if seen == 0:
            raise RuntimeError(f"worker {rank} got no training rows from its dataset shard")
    if writer:
        writer.close()


def _log_row(row: dict, n_steps: int, writer) -> None:
    # A logger, not print: Ray Train tees a patched print to stdout and to its logger when stdout
    # is wrapped, which printed every line twice.
    log.info(f"[train] {row['step']}/{n_steps} " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "step"))
    if writer:
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                writer.add_scalar(f"train/{k}" if not k.startswith("val_") else f"val/{k[4:]}", v, row["step"])
        writer.flush()


def _tensorboard(loop_config: dict, rank: int):
    """Rank 0 writes TensorBoard events live (on rank 0's node; the run folder on one machine)."""
    folder = loop_config.get("tensorboard_dir")
    if rank != 0 or not folder:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(folder)


def _maybe_kill(loop_config: dict, step: int, rank: int) -> None:
    """Failure tests only: the worker of `kill_rank` dies (SIGKILL, no cleanup) after `kill_at_step`,
    once per marker file, as a node loss would end it.

    It first waits a few seconds: Ray Train's controller collects reports at its health-check poll
    (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a checkpoint reported less than one poll before a
    crash is not registered yet and the restart would use the one before it (correct, but then
    the test could not say which step it resumed from)."""
    at, marker = loop_config.get("kill_at_step"), loop_config.get("kill_marker")
    if at and step == at and rank == loop_config.get("kill_rank", 0) and not Path(marker).exists():
        time.sleep(5)
        Path(marker).write_text(f"killed rank {rank} after step {step}")
        os.kill(os.getpid(), signal.SIGKILL)


def load_val_rows(prepared: PreparedData) -> list[dict]:
    if not prepared.val_file.is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(prepared.val_file).to_pylist()


def run_training(cfg: JobConfig, prepared: PreparedData, model_dir: Path, out_dir: Path,
                 kill_at_step: int | None = None, kill_rank: int = 0, resume: bool = True) -> TrainResult:
    """Fit on Ray Train; export the best (or last) checkpoint to `out_dir/adapter` (lora) or
    `out_dir/model` (freeze/full), the step history to metrics.jsonl and a loss plot. A run of
    the same config, data and model that stopped before the end continues from its latest
    checkpoint (`resume=False`: from step 0).
    `kill_at_step`/`kill_rank` are for failure tests (that worker is SIGKILLed once)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    tcfg = cfg.train
    manifest = prepared.manifest()
    rows_per_worker = manifest["train_rows"] // tcfg.num_workers
    if rows_per_worker == 0:
        raise RayFTError(f"train.num_workers: {manifest['train_rows']} training rows cannot feed "
                         f"{tcfg.num_workers} workers")
    steps_per_epoch(rows_per_worker, tcfg)  # raises early if accumulation cannot be filled
    val_rows = load_val_rows(prepared)
    if tcfg.metric_for_best != "val_loss" and not val_rows:
        raise RayFTError(f"train.metric_for_best={tcfg.metric_for_best} needs a dev split (data.dev_size > 0)")
    out_dir.mkdir(parents=True, exist_ok=True)
    score = tcfg.metric_for_best if val_rows else None
    storage = tcfg.storage_path or str((out_dir / "ray").resolve())
    # Same config, data and model -> same run: an interrupted run continues from its checkpoints.
    run_name = resumable_run_name(
        f"sft_{cfg.name}", {"train": tcfg.model_dump(), "data": manifest.get("config_hash"), "model": str(model_dir)},
        storage, fresh=not resume)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": cfg.model_dump(), "model_dir": str(model_dir), "rows_per_worker": rows_per_worker,
            "packed": prepared.packed(),
            "val_rows": val_rows, "tensorboard_dir": str((out_dir / "tensorboard").resolve()) if tcfg.tensorboard else None,
            "kill_at_step": kill_at_step, "kill_rank": kill_rank, "kill_marker": str(out_dir / ".killed_once"),
        },
        scaling_config=ScalingConfig(
            num_workers=tcfg.num_workers, use_gpu=tcfg.use_gpu,
            resources_per_worker={"CPU": tcfg.cpus_per_worker} if not tcfg.use_gpu else None,
        ),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=tcfg.keep_checkpoints, checkpoint_score_attribute=score,
                checkpoint_score_order="min" if score == "val_loss" else "max"),
            failure_config=FailureConfig(max_failures=tcfg.max_failures)),
        datasets={"train": ray.data.read_parquet(str(prepared.train_dir))},
        dataset_config=ordered_ingest(),
    )
    name = "adapter" if tcfg.finetuning_type == "lora" else "model"
    final, history, chosen = fit_and_export(
        trainer, out_dir, name, best_by=score, best_mode="min" if score == "val_loss" else "max",
        subdir="export")
    if not tcfg.storage_path:  # only the run folder's own storage; a given one may be shared
        prune_superseded_runs(Path(storage), f"sft_{cfg.name}", run_name)
    merged = merge_adapter(model_dir, final, out_dir / "merged") if tcfg.export_merged else None
    if history:
        from ray_ft.train.learning_curve import plot_learning_curve
        from ray_ft.plots import plot_loss

        plot_loss(history, out_dir / "loss.png")
        plot_learning_curve(history, out_dir / "learning_curve.png")
    return TrainResult(final, out_dir / "metrics.jsonl", history, chosen.get("step"), merged)
