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

import logging
from pathlib import Path

from ray_ft.config import JobConfig, TrainConfig
from ray_ft.data.prepare import PreparedData
from ray_ft.errors import RayFTError
from ray_ft.train import metrics as tm
from ray_ft.train.batches import PadCollate, answer_tokens, flattens, model_inputs
from ray_ft.train.launch import Launch, Workers, launch
from ray_ft.train.loop import (
    Counts, Schedule, latest_checkpoint, restore, run_steps, start_worker, step_writer, steps_per_epoch,
    total_steps,
)
from ray_ft.train.result import TrainResult
from ray_ft.train.methods import build_model, load_trained_weights, merge_adapter, save_trained
from ray_ft.train.steppers import make_stepper, weights_dtype

log = logging.getLogger(__name__)


class SFTSteps:
    """SFT's part of the step loop: padded or packed rows of the shard, the answer-token loss
    normalised over the whole step, loss + greedy-answer validation on the dev split."""

    def __init__(self, shard, tok, tcfg: TrainConfig, flatten: bool, val_rows: list[dict], rank: int,
                 world: int, device):
        self.shard, self.tok, self.tcfg, self.val_rows = shard, tok, tcfg, val_rows
        self.rank, self.world, self.device = rank, world, device
        pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.collate = PadCollate(pad_id, flatten)

    def micro_batches(self):
        return self.shard.iter_torch_batches(batch_size=self.tcfg.per_device_train_batch_size,
                                             collate_fn=self.collate, local_shuffle_buffer_size=None)

    def losses(self, stepper, group: list):
        import torch

        # The step's loss is the mean over every answer token of the whole group on every rank
        # (as one big batch would give), not a mean of per-micro-batch means.
        per_rank = tm.sum_over_ranks(torch.tensor(float(sum(answer_tokens(b) for b in group)),
                                                  dtype=torch.float64), self.device).float() / self.world
        for batch in group:
            loss = stepper.forward(model_inputs(batch, self.device) | {"num_items_in_batch": per_rank})
            yield loss, Counts(int(batch["num_real_tokens"]), batch["input_ids"].numel(), int(batch["num_examples"]))

    def validate(self, stepper) -> dict:
        from ray_ft.train.validation import validate

        if not self.val_rows:
            return {}
        return validate(stepper, self.tok, self.val_rows, self.tcfg, self.rank, self.world, self.device)

    def save(self, stepper, folder: Path) -> None:
        """The export form of the weights (rank 0 writes; ZeRO-3 gathers on every rank)."""
        save_trained(stepper, self.tok, folder, self.tcfg.finetuning_type, self.rank)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on each Ray Train worker."""
    import ray.train

    w = start_worker(loop_config)
    tcfg, tok, rank, world = w.tcfg, w.tok, w.rank, w.world
    model, num_params = build_model(w.model_dir, tcfg, weights_dtype(tcfg), packed=loop_config["packed"])
    attention = model.config._attn_implementation
    flatten = loop_config["packed"] and flattens(attention)
    if rank == 0:
        log.info("[train] %s rows, attention: %s", "packed" if loop_config["packed"] else "padded", attention
                 + (" (a batch of packed rows is flattened into one row)" if flatten else ""))
    rows_per_worker = loop_config["rows_per_worker"]
    n_steps, per_epoch = total_steps(rows_per_worker, tcfg), steps_per_epoch(rows_per_worker, tcfg)
    with latest_checkpoint() as ckpt:
        if ckpt is not None:  # a restart after a failure: weights first, before any wrapping
            load_trained_weights(model, ckpt / "export", tcfg.finetuning_type)
        stepper = make_stepper(model, tcfg, n_steps, world)
        state = restore(stepper, ckpt)
    device = ray.train.torch.get_device()
    steps = SFTSteps(ray.train.get_dataset_shard("train"), tok, tcfg, flatten, loop_config.get("val_rows") or [],
                     rank, world, device)
    writer = step_writer(loop_config, rank)
    run_steps(steps, stepper, Schedule.of(tcfg, n_steps, per_epoch, tm.flops_per_token(num_params, tcfg.finetuning_type),
                                          "train"),
              state, rank, world, device, writer, loop_config.get("test_faults"))
    if writer:
        writer.close()


def load_val_rows(prepared: PreparedData) -> list[dict]:
    if not prepared.val_file.is_file():
        return []
    import pyarrow.parquet as pq

    return pq.read_table(prepared.val_file).to_pylist()


def run_training(cfg: JobConfig, prepared: PreparedData, model_dir: Path, out_dir: Path,
                 resume: bool = True) -> TrainResult:
    """Fit on Ray Train; export the best (or last) checkpoint to `out_dir/adapter` (lora) or
    `out_dir/model` (freeze/full), the step history to metrics.jsonl and a loss plot. A run of
    the same config, data and model that stopped before the end continues from its latest
    checkpoint (`resume=False`: from step 0)."""
    import ray

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
    score = tcfg.metric_for_best if val_rows else None
    spec = Launch(
        train_loop_per_worker,
        loop_config={
            "job": cfg.model_dump(), "model_dir": str(model_dir), "rows_per_worker": rows_per_worker,
            "packed": prepared.packed(), "val_rows": val_rows,
            "tensorboard_dir": str((out_dir / "tensorboard").resolve()) if tcfg.tensorboard else None,
        },
        workers=Workers(tcfg.num_workers, tcfg.use_gpu, tcfg.cpus_per_worker),
        # Same config, data and model -> same run: an interrupted run continues from its checkpoints.
        run_prefix=f"sft_{cfg.name}",
        identity={"train": tcfg.model_dump(), "data": manifest.get("config_hash"), "model": str(model_dir)},
        datasets={"train": ray.data.read_parquet(str(prepared.train_dir))},
        export_name="adapter" if tcfg.finetuning_type == "lora" else "model",
        keep_checkpoints=tcfg.keep_checkpoints, max_failures=tcfg.max_failures,
        best_by=score, best_mode="min" if score == "val_loss" else "max",
        storage_path=tcfg.storage_path, subdir="export")
    final, history, chosen = launch(spec, out_dir, resume)
    merged = merge_adapter(model_dir, final, out_dir / "merged") if tcfg.export_merged else None
    plot_history(history, out_dir)
    return TrainResult(final, out_dir / "metrics.jsonl", history, chosen.get("step"), merged)


def plot_history(history: list[dict], out_dir: Path) -> None:
    if history:
        from ray_ft.plots import plot_loss
        from ray_ft.train.learning_curve import plot_learning_curve

        plot_loss(history, out_dir / "loss.png")
        plot_learning_curve(history, out_dir / "learning_curve.png")
