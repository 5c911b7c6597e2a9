"""The step loop of the LLM recipes, written once: accumulation, resume, metrics, validation
cadence, best/last checkpoints and early stopping. A recipe supplies what differs (`StepRecipe`):

    recipe.micro_batches()           # one epoch of this rank's micro-batches, in a fixed order
    recipe.losses(stepper, group)    # yields (loss, Counts) per micro-batch of one optimizer step;
                                     # the loop runs the backward pass between yields
    recipe.validate(stepper)         # {"val_...": value}, called on every rank
    recipe.save(stepper, folder)     # the checkpoint's weights (collective under ZeRO)

A recipe's losses over one group sum to the step's loss on its rank (each already divided by
what the whole step averages over); DDP and DeepSpeed average the ranks' gradients.

A resumed run (Ray Train restarting the worker group from the latest checkpoint after a failure)
restores the optimizer, scheduler, step, best score and history, and skips the micro-batches of
the current epoch that it already trained on, so it sees the data an uninterrupted run sees.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ray_ft.config import JobConfig, TrainConfig
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl
from ray_ft.train import faults
from ray_ft.train import metrics as tm
from ray_ft.train.checkpoints import HISTORY_FILE, checkpoint_problems, report_checkpoint

log = logging.getLogger(__name__)
LOOP_STATE = "loop_state.json"


@dataclass
class Counts:
    """What one micro-batch trained on. `sums` are per-example sums (e.g. correct preference
    pairs); the step's row reports each as a mean over the step's examples."""

    tokens: int  # real (non-padding) tokens
    slots: int  # token positions including padding
    examples: int
    sums: dict[str, float] = field(default_factory=dict)


class StepRecipe(Protocol):
    def micro_batches(self) -> Iterable: ...
    def losses(self, stepper, group: list) -> Iterator[tuple[object, Counts]]: ...
    def validate(self, stepper) -> dict: ...
    def save(self, stepper, folder: Path) -> None: ...


@dataclass(frozen=True)
class Worker:
    """What a recipe's Ray Train worker starts from."""

    job: JobConfig
    model_dir: str
    rank: int
    world: int
    tok: object  # the model's tokenizer

    @property
    def tcfg(self) -> TrainConfig:
        return self.job.train


def start_worker(loop_config: dict) -> Worker:
    """On a Ray Train worker: the job re-validated (`loop_config` is Ray's transport), this rank,
    torch's CPU threads set to the worker's CPUs, the tokenizer loaded."""
    import ray.train
    import torch
    from transformers import AutoTokenizer

    job = JobConfig.model_validate(loop_config["job"])
    ctx = ray.train.get_context()
    if not job.train.use_gpu:
        torch.set_num_threads(max(1, int(job.train.cpus_per_worker)))
    model_dir = loop_config["model_dir"]
    return Worker(job, model_dir, ctx.get_world_rank(), ctx.get_world_size(), AutoTokenizer.from_pretrained(model_dir))


@dataclass(frozen=True)
class Schedule:
    n_steps: int
    per_epoch: int  # optimizer steps per epoch
    accumulation: int  # micro-batches per optimizer step
    eval_every: int | None
    log_every: int
    metric: str  # the validation metric that picks the best checkpoint
    patience: int | None  # validations without improvement before stopping
    seed: int
    flops_per_token: float
    peak_tflops: float | None
    use_gpu: bool
    micro_steps: bool  # DeepSpeed counts every micro-batch (engine.step between them)
    all_ranks_save: bool  # sharded state: every rank writes its part of a checkpoint
    tag: str = "train"

    @classmethod
    def of(cls, tcfg: TrainConfig, n_steps: int, per_epoch: int, flops_per_token: float, tag: str) -> "Schedule":
        return cls(
            n_steps=n_steps, per_epoch=per_epoch, accumulation=tcfg.gradient_accumulation_steps,
            eval_every=tcfg.eval_every_n_steps, log_every=tcfg.log_every_n_steps, metric=tcfg.metric_for_best,
            patience=tcfg.early_stopping_patience, seed=tcfg.seed, flops_per_token=flops_per_token,
            peak_tflops=tm.peak_tflops(tcfg.use_gpu), use_gpu=tcfg.use_gpu,
            micro_steps=bool(tcfg.deepspeed.stage), all_ranks_save=bool(tcfg.deepspeed.stage), tag=tag)


@dataclass
class LoopState:
    step: int = 0
    best: float | None = None
    since_best: int = 0
    history: list[dict] = field(default_factory=list)
    resumed_from: int | None = None

    def write(self, folder: Path) -> None:
        (folder / LOOP_STATE).write_text(json.dumps({"step": self.step, "best": self.best,
                                                     "since_best": self.since_best}))

    @classmethod
    def read(cls, folder: Path) -> "LoopState":
        state = json.loads((folder / LOOP_STATE).read_text())
        return cls(state["step"], state["best"], state["since_best"], read_jsonl(folder / HISTORY_FILE),
                   resumed_from=state["step"])


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


def is_better(metric: str, value: float, best: float | None) -> bool:
    return best is None or (value < best if metric == "val_loss" else value > best)


def step_seed(seed: int, rank: int, step: int) -> int:
    """Dropout randomness of a step from (seed, rank, step): a resumed run draws the same."""
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**31)


@contextlib.contextmanager
def latest_checkpoint():
    """Ray Train's latest checkpoint (after a restart) as a local folder; None on a fresh start.
    One whose files do not match their recorded hashes is passed over for the newest one before
    it that does (a warning names what is wrong); none whole: an error."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        yield None
        return
    for candidate in itertools.chain([ckpt], _earlier_checkpoints(ckpt)):
        with candidate.as_directory() as d:
            problems = checkpoint_problems(Path(d))
            if not problems:
                if candidate is not ckpt:
                    log.warning("resuming from %s instead", candidate.path)
                yield Path(d)
                return
        log.warning("checkpoint %s is damaged, not loaded: %s", candidate.path, "; ".join(problems[:3]))
    raise RayFTError(f"{ckpt.path}: no whole checkpoint to resume from (every one is damaged); start again "
                     "with `--force train`")


def _earlier_checkpoints(ckpt):
    """The run's other checkpoints older than `ckpt`, newest first (Ray names them
    checkpoint_<timestamp>, so names sort by time); listed only when asked for the first one."""
    import pyarrow.fs as pafs
    import ray.train

    parent, name = ckpt.path.rstrip("/").rsplit("/", 1)
    infos = ckpt.filesystem.get_file_info(pafs.FileSelector(parent))
    older = sorted((i.base_name for i in infos if i.type == pafs.FileType.Directory
                    and i.base_name.startswith("checkpoint_") and i.base_name < name), reverse=True)
    for n in older:
        yield ray.train.Checkpoint(f"{parent}/{n}", filesystem=ckpt.filesystem)


def restore(stepper, folder: Path | None) -> LoopState:
    """The loop state of a checkpoint folder (and the stepper's optimizer/scheduler), or a fresh one."""
    if folder is None:
        return LoopState()
    stepper.load_state(folder)
    return LoopState.read(folder)


def run_steps(recipe: StepRecipe, stepper, sched: Schedule, state: LoopState, rank: int, world: int,
              device, writer=None, test_faults: dict | None = None) -> LoopState:
    """Train until `sched.n_steps` (or early stopping); returns the final state."""
    import torch

    stop = bool(sched.patience and state.since_best >= sched.patience)
    if state.resumed_from is not None and rank == 0:
        log.info("[%s] resumed at step %d", sched.tag, state.step)

    def save(folder: Path) -> None:
        recipe.save(stepper, folder)
        if rank == 0:
            state.write(folder)
        stepper.save_state(folder, rank)

    stepper.train(True)
    acc = _Window()
    examples_seen = state.history[-1].get("examples_seen", 0) if state.history else 0
    while state.step < sched.n_steps and not stop:
        skip = (state.step % sched.per_epoch) * sched.accumulation  # micro-batches a resumed run did
        seen, group, t_ask = 0, [], time.perf_counter()
        for micro, batch in enumerate(recipe.micro_batches()):
            acc.waited += time.perf_counter() - t_ask  # time blocked on the data pipeline
            seen += 1
            if micro < skip:
                continue
            if micro >= sched.per_epoch * sched.accumulation:
                break  # the partial accumulation group at the epoch's end
            group.append(batch)
            if len(group) < sched.accumulation:
                t_ask = time.perf_counter()
                continue
            torch.manual_seed(step_seed(sched.seed, rank, state.step))
            for i, (loss, counts) in enumerate(recipe.losses(stepper, group)):
                last = i == len(group) - 1
                stepper.backward(loss, boundary=last)
                if not last and sched.micro_steps:
                    stepper.micro_step()
                acc.add(loss.item(), counts)
            group = []
            grad_norm = stepper.step()
            state.step += 1
            row, examples = acc.row(state.step, sched, stepper.lr, grad_norm, world, device)
            examples_seen += examples
            row["examples_seen"] = examples_seen
            if state.resumed_from is not None:
                row["resumed_from_step"], state.resumed_from = state.resumed_from, None
            evaluate = state.step == sched.n_steps or bool(sched.eval_every and state.step % sched.eval_every == 0)
            if evaluate:
                stop = _validate(recipe, stepper, sched, state, row)
            state.history.append(row)
            if rank == 0 and (state.step % sched.log_every == 0 or evaluate):
                log_row(row, sched, writer)
            faults.maybe_fail(test_faults, state.step, rank)
            if evaluate or stop:
                # Ray Train merges the ranks' files into one checkpoint folder and keeps the best
                # ones by the reported metric.
                report_checkpoint(state.history, rank, save, all_ranks_save=sched.all_ranks_save)
            if state.step == sched.n_steps or stop:
                break
            acc = _Window()
            t_ask = acc.t0
        if seen == 0:
            raise RuntimeError(f"worker {rank} got no training rows from its dataset shard")
    return state


def _validate(recipe: StepRecipe, stepper, sched: Schedule, state: LoopState, row: dict) -> bool:
    """Validation into `row`, best-score bookkeeping; True when early stopping ends the run."""
    t_val = time.perf_counter()
    scores = recipe.validate(stepper)
    if not scores:
        return False
    row.update(scores)
    row["val_s"] = time.perf_counter() - t_val
    if is_better(sched.metric, row[sched.metric], state.best):
        state.best, state.since_best = row[sched.metric], 0
    else:
        state.since_best += 1
    stop = bool(sched.patience and state.since_best >= sched.patience)
    row["early_stop"] = stop
    return stop


class _Window:
    """Sums over the micro-batches of one optimizer step (and the time since it began)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.loss, self.tokens, self.slots, self.examples, self.waited = 0.0, 0, 0, 0, 0.0
        self.sums: dict[str, float] = {}

    def add(self, loss: float, c: Counts) -> None:
        self.loss += loss
        self.tokens += c.tokens
        self.slots += c.slots
        self.examples += c.examples
        for k, v in c.sums.items():
            self.sums[k] = self.sums.get(k, 0.0) + v

    def row(self, step: int, sched: Schedule, lr: float, grad_norm, world: int, device) -> tuple[dict, int]:
        """The step's metrics row (summed over ranks) and the examples it trained on."""
        import torch

        dt = time.perf_counter() - self.t0
        keys = sorted(self.sums)
        totals = tm.sum_over_ranks(torch.tensor(
            [self.loss, self.tokens, self.slots, self.examples, *(self.sums[k] for k in keys)],
            dtype=torch.float64), device).tolist()
        tokens_per_s = totals[1] / dt
        achieved = tokens_per_s * sched.flops_per_token / 1e12
        row = {
            "step": step, "epoch": round(step / sched.per_epoch, 3), "loss": totals[0] / world,
            **{k: v / max(totals[3], 1) for k, v in zip(keys, totals[4:])},
            "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s, "tflops": achieved,
            "mfu": (achieved / (sched.peak_tflops * world)) if sched.peak_tflops else None,
            "padding_ratio": 1.0 - totals[1] / totals[2] if totals[2] else 0.0,
            "peak_mem_mb": tm.peak_memory_mb(sched.use_gpu), "step_time_s": dt, "data_wait_s": self.waited,
        }
        return row, int(totals[3])


def log_row(row: dict, sched: Schedule, writer) -> None:
    # A logger, not print: Ray Train tees a patched print to stdout and to its logger when stdout
    # is wrapped, which printed every line twice.
    log.info(f"[{sched.tag}] {row['step']}/{sched.n_steps} " + " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items() if k != "step"))
    if writer:
        writer.write(row, sched)


class StepWriter:
    """Where rank 0's logged step rows go besides the worker's log: TensorBoard events
    (train.tensorboard; on rank 0's node, the run folder on one machine) and the stage's progress
    file, which the driver's run view reads (`ray_ft.console`; shared storage on a cluster)."""

    def __init__(self, tensorboard_dir: str | None, progress_file: str | None):
        self.tb = None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir)
        self.progress_file = progress_file

    def write(self, row: dict, sched: Schedule) -> None:
        if self.progress_file:
            with open(self.progress_file, "a", encoding="utf-8") as f:
                f.write(json.dumps({**row, "n_steps": sched.n_steps, "tag": sched.tag}) + "\n")
        if self.tb:
            for k, v in row.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                    self.tb.add_scalar(f"train/{k}" if not k.startswith("val_") else f"val/{k[4:]}", v, row["step"])
            self.tb.flush()

    def close(self) -> None:
        if self.tb:
            self.tb.close()


def step_writer(loop_config: dict, rank: int) -> StepWriter | None:
    """Rank 0's StepWriter for the run's `tensorboard_dir` and `progress_file` (from `launch`)."""
    if rank != 0:
        return None
    return StepWriter(loop_config.get("tensorboard_dir"), loop_config.get("progress_file"))
