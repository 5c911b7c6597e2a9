"""Cross-encoder reranker training on Ray Train, on the shared step loop (`ray_ft.train.loop`).

Each worker reads its shard of the embedding triplets (query, positives, negatives — mined ones
with `embed.hard_negatives`), pairs every query with its positive and `train_group_size - 1` of
its negatives (drawn under the step's seed, so a resumed run draws the same), scores the pairs
with the cross-encoder and minimises the listwise softmax loss over each group
(`ray_ft.train.contrastive.listwise_loss`, FlagEmbedding's reranker objective). Validation
reranks the first stage's candidates of held-out questions (`ray_ft.metrics.reranking`), split
over the ranks; the checkpoint with the best MRR@10 is exported as a Hugging Face
sequence-classification folder (`ray_ft.reranker`).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path

from ray_ft.config import JobConfig, RerankConfig
from ray_ft.errors import RayFTError
from ray_ft.metrics.reranking import CandidateGroup, gold_rank
from ray_ft.reranker import encode_pairs, load_cross_encoder, pair_logits
from ray_ft.train import metrics as tm
from ray_ft.train.embed import group_passages, steps_per_epoch, total_steps, write_triplets
from ray_ft.train.launch import Launch, Workers, launch
from ray_ft.train.loop import Counts, Schedule, latest_checkpoint, restore, run_steps, step_writer

log = logging.getLogger(__name__)
VAL_METRIC = "val_mrr_at_10"


@dataclass(frozen=True)
class RerankTrainResult:
    model_dir: Path
    history: list[dict]
    best_step: int | None  # the step whose checkpoint was exported


def listwise_objective(group: int):
    """The stepper's `loss_of`: the model's pair logits -> listwise loss over groups of `group`."""
    from ray_ft.train.contrastive import listwise_loss

    def loss_of(model, inputs: dict):
        return listwise_loss(model(**inputs).logits.reshape(-1), group)

    return loss_of


class RerankSteps:
    """The reranker's part of the step loop: groups of (query, passage) pairs, the listwise
    loss, reranking validation."""

    def __init__(self, shard, tok, rcfg: RerankConfig, val_groups: list[CandidateGroup], rank: int,
                 world: int, device):
        self.shard, self.tok, self.rcfg, self.val_groups = shard, tok, rcfg, val_groups
        self.rank, self.world, self.device = rank, world, device

    def micro_batches(self):
        return self.shard.iter_batches(batch_size=self.rcfg.per_device_batch_size, drop_last=True)

    def losses(self, stepper, group: list):
        import torch

        g = self.rcfg.train_group_size
        for batch in group:
            # The loop seeded torch for this (rank, step): the negatives drawn follow that seed.
            passages = group_passages(batch, g, random.Random(torch.initial_seed()))
            queries = [str(q) for q in batch["query"] for _ in range(g)]
            enc = encode_pairs(self.tok, queries, passages, self.rcfg.max_len)
            mask = enc["attention_mask"]
            loss = stepper.forward({k: v.to(self.device) for k, v in enc.items()})
            yield loss, Counts(int(mask.sum()), mask.numel(), len(batch["query"]))

    def validate(self, stepper) -> dict:
        """hit@1, hit@5 and MRR@10 of the reranked candidates; each rank scores every
        world-th question and the sums are combined."""
        import torch

        if not self.val_groups:
            return {}
        model = stepper.module
        model.eval()
        sums = [0.0, 0.0, 0.0, 0.0]
        try:
            for grp in self.val_groups[self.rank::self.world]:
                logits = pair_logits(model, self.tok, [grp.query] * len(grp.candidates), grp.candidates,
                                     self.rcfg.max_len, self.device)
                rank = gold_rank(grp, [int(i) for i in (-logits).argsort(kind="stable")])
                sums[0] += rank is not None and rank < 1
                sums[1] += rank is not None and rank < 5
                sums[2] += 1.0 / (rank + 1) if rank is not None and rank < 10 else 0.0
                sums[3] += 1
        finally:
            model.train()
        hit1, hit5, rr, n = tm.sum_over_ranks(torch.tensor(sums, dtype=torch.float64), self.device).tolist()
        return {"val_hit_at_1": hit1 / n, "val_hit_at_5": hit5 / n, VAL_METRIC: rr / n}

    def save(self, stepper, folder: Path) -> None:
        if self.rank == 0:
            stepper.module.save_pretrained(folder / "model")
            self.tok.save_pretrained(folder / "model")


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file

    from ray_ft.train.steppers import TorchStepper

    job = JobConfig.model_validate(loop_config["job"])
    rcfg, tcfg = job.rerank, job.rerank.step_settings()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not rcfg.use_gpu:
        torch.set_num_threads(max(1, int(rcfg.cpus_per_worker)))
    model, tok = load_cross_encoder(loop_config["model_dir"], seed=rcfg.seed)  # same head on every rank
    per_worker = loop_config["triplets_per_worker"]
    n_steps, per_epoch = total_steps(per_worker, rcfg), steps_per_epoch(per_worker, rcfg)
    with latest_checkpoint() as ckpt:
        if ckpt is not None:  # a restart after a failure: the weights first, before DDP wraps them
            model.load_state_dict(load_file(str(ckpt / "model" / "model.safetensors")))
        stepper = TorchStepper(model, tcfg, n_steps, loss_of=listwise_objective(rcfg.train_group_size))
        state = restore(stepper, ckpt)
    device = ray.train.torch.get_device()
    val = [CandidateGroup.from_dict(g) for g in loop_config.get("val_groups") or []]
    steps = RerankSteps(ray.train.get_dataset_shard("train"), tok, rcfg, val, rank, world, device)
    num_params = sum(p.numel() for p in model.parameters())
    sched = Schedule(
        n_steps=n_steps, per_epoch=per_epoch, accumulation=1, eval_every=rcfg.eval_every_n_steps, log_every=1,
        metric=VAL_METRIC, patience=rcfg.early_stopping_patience, seed=rcfg.seed,
        flops_per_token=tm.flops_per_token(num_params, "full"), peak_tflops=tm.peak_tflops(rcfg.use_gpu),
        use_gpu=rcfg.use_gpu, micro_steps=False, all_ranks_save=False, tag="rerank")
    run_steps(steps, stepper, sched, state, rank, world, device, step_writer(loop_config, rank),
              loop_config.get("test_faults"))


def run_rerank_training(cfg: JobConfig, triplets: list[dict], model_dir: Path, out_dir: Path,
                        val_groups: list[CandidateGroup], resume: bool = True) -> RerankTrainResult:
    """Fit on Ray Train; the best (by validation MRR@10, else the last) cross-encoder folder lands
    in `out_dir/model`. A run of the same config, data and model that stopped before the end
    continues from its latest checkpoint (`resume=False`: from step 0)."""
    import hashlib
    import json

    import ray

    rcfg = cfg.rerank
    per_worker = len(triplets) // rcfg.num_workers
    if per_worker < rcfg.per_device_batch_size:
        raise RayFTError(f"rerank.per_device_batch_size: {len(triplets)} triplets cannot fill a batch of "
                         f"{rcfg.per_device_batch_size} on each of {rcfg.num_workers} workers")
    if rcfg.early_stopping_patience and not (val_groups and rcfg.eval_every_n_steps):
        raise RayFTError("rerank.early_stopping_patience needs validation questions (embed.val_size > 0) "
                         "and rerank.eval_every_n_steps")
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = [g.to_dict() for g in val_groups]
    key = hashlib.sha256(json.dumps([triplets, groups], sort_keys=True).encode()).hexdigest()
    spec = Launch(
        train_loop_per_worker,
        loop_config={"job": cfg.model_dump(), "model_dir": str(model_dir), "triplets_per_worker": per_worker,
                     "val_groups": groups},
        workers=Workers(rcfg.num_workers, rcfg.use_gpu, rcfg.cpus_per_worker),
        run_prefix="rerank",
        identity={"rerank": rcfg.model_dump(), "data": key, "model": str(model_dir)},
        datasets={"train": ray.data.read_parquet(str(write_triplets(triplets, out_dir).resolve()))},
        export_name="model", keep_checkpoints=rcfg.keep_checkpoints, max_failures=rcfg.max_failures,
        best_by=VAL_METRIC if val_groups else None, best_mode="max", subdir="model")
    final, history, chosen = launch(spec, out_dir, resume)
    return RerankTrainResult(final, history, chosen.get("step"))
