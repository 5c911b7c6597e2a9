"""Preference tuning of a causal LM on Ray Train: DPO (against the adapter-disabled base) or ORPO.

Setup: the pairs of `train.preference.source` are read (one-line errors per record), split by
prompt into train and dev (seeded), and tokenized on Ray Data with the chat template, one row per
pair (the prompt stored once). Train: each worker reads its parquet shard; a micro-batch of n
pairs is one forward pass over 2n rows (chosen, then rejected); the loop (`ray_ft.train.loop`)
does accumulation, resume, validation and checkpoints as for SFT. Validation scores the dev pairs:
loss, reward accuracy (chosen reward > rejected) and mean margin. With `data.packing`, a
micro-batch is padding-free: its 2n sequences end to end in one row, cut per sequence by the
packed attention (`train.attn_implementation` "auto" or flash-attention). Save: the LoRA adapter, served
like an SFT adapter.

FLOP convention for MFU: LoRA DPO is 6N per token of both rows (policy forward + input gradients
4N, the reference forward 2N); ORPO has no reference pass (4N; 6N for full fine-tuning).
"""

from __future__ import annotations

import logging
from pathlib import Path

from ray_ft.config import JobConfig, TrainConfig
from ray_ft.data.prepare import PreparedData
from ray_ft.data.preference import PAIR_COLUMNS, read_preference_source, write_pair_shards
from ray_ft.data.split import split_by_group
from ray_ft.errors import RayFTError
from ray_ft.io import write_text_atomic
from ray_ft.train import metrics as tm
from ray_ft.train.batches import flattens
from ray_ft.train.launch import Launch, Workers, launch
from ray_ft.train.loss import supports_logits_to_keep
from ray_ft.train.loop import (
    Counts, Schedule, latest_checkpoint, restore, run_steps, start_worker, step_writer, steps_per_epoch,
    total_steps,
)
from ray_ft.train.methods import build_model, load_trained_weights, save_trained
from ray_ft.train.preference import pair_batch, preference_loss
from ray_ft.train.result import TrainResult
from ray_ft.train.steppers import make_stepper, weights_dtype
from ray_ft.train.validation import rank_slice

log = logging.getLogger(__name__)


def flops_per_token(num_params: int, tcfg: TrainConfig) -> float:
    reference = 2.0 * num_params if tcfg.method == "dpo" else 0.0
    return tm.flops_per_token(num_params, tcfg.finetuning_type) + reference


class PreferenceSteps:
    """The preference recipe's part of the step loop."""

    def __init__(self, shard, tok, tcfg: TrainConfig, flatten: bool, val_rows: list[dict], rank: int, world: int,
                 device):
        self.shard, self.tok, self.tcfg, self.flatten, self.val_rows = shard, tok, tcfg, flatten, val_rows
        self.rank, self.world, self.device = rank, world, device
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.reference = None  # the bare model, once the stepper has wrapped it
        self.trained_only = None  # logits at completion positions only: decided on the bare model

    def batch(self, rows: list[dict]) -> dict:
        return {k: v.to(self.device) for k, v in pair_batch(rows, self.pad_id, self.flatten).items()}

    def micro_batches(self):
        for batch in self.shard.iter_batches(batch_size=self.tcfg.per_device_train_batch_size,
                                             batch_format="numpy", local_shuffle_buffer_size=None):
            n = len(batch["id"])
            yield [{k: batch[k][i] for k in PAIR_COLUMNS} for i in range(n)]

    def losses(self, stepper, group: list):
        for rows in group:
            inputs = self.batch(rows)
            out = stepper.forward(inputs)
            mask = inputs.get("attention_mask")
            real = int(mask.sum()) if mask is not None else inputs["input_ids"].numel()
            yield out.loss / len(group), Counts(
                real, inputs["input_ids"].numel(), len(rows),
                {"reward_accuracy": float((out.chosen_rewards > out.rejected_rewards).sum()),
                 "reward_margin": float((out.chosen_rewards - out.rejected_rewards).sum())})

    def loss_of(self, model, inputs: dict):
        """The stepper's objective: the policy through the (DDP/DeepSpeed) wrapped `model`, the
        reference through the bare peft model with its adapter switched off (`self.reference`)."""
        p = self.tcfg.preference
        return preference_loss(model, inputs, self.tcfg.method, p.beta, p.label_smoothing, p.orpo_lambda,
                               reference=self.reference, trained_only=self.trained_only)

    def validate(self, stepper) -> dict:
        """Loss, reward accuracy and margin over the dev pairs; every rank scores a strided slice
        and the sums are all-reduced (under ZeRO-3 the forward passes are collective)."""
        import torch

        if not self.val_rows:
            return {}
        p = self.tcfg.preference
        rows = self.val_rows[: p.val_max_pairs]
        picks = rank_slice(len(rows), self.rank, self.world)
        sums = torch.zeros(5, dtype=torch.float64)  # weight, loss, correct, margin, chosen reward
        bs = self.tcfg.per_device_train_batch_size
        stepper.train(False)
        try:
            with torch.no_grad():
                for start in range(0, len(picks), bs):
                    chunk = picks[start:start + bs]
                    out = preference_loss(stepper.module, self.batch([rows[i] for i, _ in chunk]), self.tcfg.method,
                                          p.beta, p.label_smoothing, p.orpo_lambda, trained_only=self.trained_only)
                    w = torch.tensor([wt for _, wt in chunk], dtype=torch.float64)
                    c, r = out.chosen_rewards.double().cpu(), out.rejected_rewards.double().cpu()
                    sums += torch.stack([w.sum(), (w * out.pair_losses.double().cpu()).sum(), (w * (c > r)).sum(),
                                         (w * (c - r)).sum(), (w * c).sum()])
        finally:
            stepper.train(True)
        total = tm.sum_over_ranks(sums, self.device).tolist()
        n = total[0]
        return {"val_loss": total[1] / n, "val_reward_accuracy": total[2] / n, "val_reward_margin": total[3] / n,
                "val_chosen_reward": total[4] / n, "val_pairs": int(n)}

    def save(self, stepper, folder: Path) -> None:
        save_trained(stepper, self.tok, folder, self.tcfg.finetuning_type, self.rank)


def preference_loop_per_worker(loop_config: dict) -> None:
    """Runs on each Ray Train worker."""
    import ray.train

    w = start_worker(loop_config)
    tcfg, tok, rank, world = w.tcfg, w.tok, w.rank, w.world
    model, num_params = build_model(w.model_dir, tcfg, weights_dtype(tcfg), packed=loop_config["packed"])
    device = ray.train.torch.get_device()
    flatten = loop_config["packed"] and flattens(model.config._attn_implementation)
    if rank == 0 and loop_config["packed"]:
        log.info("[%s] %s", tcfg.method, "padding-free: a micro-batch's sequences go end to end in one row"
                 if flatten else f"data.packing, but {model.config._attn_implementation} attention needs padded rows")
    steps = PreferenceSteps(ray.train.get_dataset_shard("train"), tok, tcfg, flatten, loop_config["val_rows"], rank,
                            world, device)
    rows_per_worker = loop_config["rows_per_worker"]
    n_steps, per_epoch = total_steps(rows_per_worker, tcfg), steps_per_epoch(rows_per_worker, tcfg)
    with latest_checkpoint() as ckpt:
        if ckpt is not None:  # a restart after a failure: weights first, before any wrapping
            load_trained_weights(model, ckpt / "export", tcfg.finetuning_type)
        stepper = make_stepper(model, tcfg, n_steps, world, loss_of=steps.loss_of)
        steps.reference = stepper.module
        steps.trained_only = supports_logits_to_keep(model)
        state = restore(stepper, ckpt)
    writer = step_writer(loop_config, rank)
    run_steps(steps, stepper, Schedule.of(tcfg, n_steps, per_epoch, flops_per_token(num_params, tcfg), tcfg.method),
              state, rank, world, device, writer, loop_config.get("test_faults"))
    if writer:
        writer.close()


def run_preference(cfg: JobConfig, prepared: PreparedData | None, model_dir: Path, out_dir: Path,
                   resume: bool = True) -> TrainResult:
    """Read, split and tokenize the pairs; fit on Ray Train; export the best (by
    `metric_for_best` on the dev pairs, else the last) adapter to `out_dir/adapter`, the step
    history to metrics.jsonl. `prepared` (the SFT shards) is not read: the pairs are the data."""
    import hashlib
    import json

    import ray

    from ray_ft.data.sources import source_fingerprint

    tcfg, p = cfg.train, cfg.train.preference
    pairs, report = read_preference_source(p.source, cfg.data.on_error)
    train, dev = split_by_group(pairs, lambda x: x.group, p.dev_size, cfg.data.seed) if p.dev_size else (pairs, [])
    shards = write_pair_shards(train, dev, str(model_dir), cfg.model.system_prompt, cfg.data.cutoff_len,
                               out_dir / "pairs", tcfg.num_workers)
    manifest = {"source": p.source, "read_pairs": len(pairs), "skipped_records": report.skipped_records,
                **shards.manifest}
    write_text_atomic(out_dir / "pairs" / "manifest.json", json.dumps(manifest, indent=2))
    log.info("[%s] %s", tcfg.method, manifest)
    rows_per_worker = shards.train_rows // tcfg.num_workers
    steps_per_epoch(rows_per_worker, tcfg)  # raises early if accumulation cannot be filled
    if tcfg.metric_for_best != "val_loss" and not shards.dev_rows:
        raise RayFTError(f"train.metric_for_best={tcfg.metric_for_best} needs dev pairs (train.preference.dev_size > 0)")
    score = tcfg.metric_for_best if shards.dev_rows else None
    spec = Launch(
        preference_loop_per_worker,
        loop_config={"job": cfg.model_dump(), "model_dir": str(model_dir), "rows_per_worker": rows_per_worker,
                     "val_rows": shards.dev_rows, "packed": cfg.data.packing,
                     "tensorboard_dir": str((out_dir / "tensorboard").resolve()) if tcfg.tensorboard else None},
        workers=Workers(tcfg.num_workers, tcfg.use_gpu, tcfg.cpus_per_worker),
        run_prefix=f"{tcfg.method}_{cfg.name}",
        identity={"train": tcfg.model_dump(), "pairs": hashlib.sha256(source_fingerprint(p.source)).hexdigest(),
                  "data": {"seed": cfg.data.seed, "on_error": cfg.data.on_error}, "model": str(model_dir),
                  "system_prompt": cfg.model.system_prompt, "cutoff_len": cfg.data.cutoff_len,
                  "packing": cfg.data.packing},
        datasets={"train": ray.data.read_parquet(str(shards.train_dir))},
        export_name="adapter", keep_checkpoints=tcfg.keep_checkpoints, max_failures=tcfg.max_failures,
        best_by=score, best_mode="min" if score == "val_loss" else "max", storage_path=tcfg.storage_path,
        subdir="export")
    final, history, chosen = launch(spec, out_dir, resume)
    if history:
        from ray_ft.plots import plot_loss

        plot_loss(history, out_dir / "loss.png")
    return TrainResult(final, out_dir / "metrics.jsonl", history, chosen.get("step"))
