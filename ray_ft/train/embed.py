"""Contrastive fine-tuning of a sentence-transformers embedder on Ray Train, on the shared step
loop (`ray_ft.train.loop`: resume, metrics, validation cadence, best checkpoint).

Each worker reads its shard of FlagEmbedding-format triplets (`ray.train.get_dataset_shard`),
samples `train_group_size - 1` of each query's stored negatives per step (seeded), embeds
queries (with the instruction prefix) and passages with the model, and minimizes InfoNCE with
in-batch and, across workers, cross-device negatives (`ray_ft.train.contrastive`), optionally
through GradCache (whose chunked backward runs inside the recipe's objective). The final
checkpoint is a complete sentence-transformers folder (the base folder's modules with the
trained weights), loadable by sentence-transformers and FlagEmbedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from ray_ft.config import EmbedConfig, JobConfig, TrainConfig
from ray_ft.errors import RayFTError
from ray_ft.train import metrics as tm
from ray_ft.train.launch import Launch, Workers, launch
from ray_ft.train.loop import Counts, Schedule, latest_checkpoint, restore, run_steps, step_writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedTrainResult:
    model_dir: Path
    history: list[dict]
    best_step: int | None  # the step whose checkpoint was exported


class SentenceEncoder:
    """HF encoder + pooling + L2 norm, called on tokenized inputs (a torch module wrapper)."""

    @staticmethod
    def build(model_dir: str, pooling: str):
        import torch
        import torch.nn.functional as F
        from transformers import AutoModel

        class _Encoder(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = AutoModel.from_pretrained(model_dir)
                # BERT's pooler head is not part of a sentence vector; frozen, DDP does not wait
                # for gradients it never gets (and the saved folder keeps the original head).
                pooler = getattr(self.model, "pooler", None)
                if pooler is not None:
                    pooler.requires_grad_(False)

            def forward(self, inputs: dict) -> torch.Tensor:
                hidden = self.model(**inputs).last_hidden_state
                if pooling == "cls":
                    vec = hidden[:, 0]
                else:
                    mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                    vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                return F.normalize(vec, dim=-1)

        return _Encoder()


def steps_per_epoch(n_triplets_per_worker: int, ecfg: EmbedConfig) -> int:
    """Steps per epoch of a triplet recipe (embedding, rerank: configs with per_device_batch_size,
    max_steps, num_train_epochs), full batches only."""
    return max(1, n_triplets_per_worker // ecfg.per_device_batch_size)


def total_steps(n_triplets_per_worker: int, ecfg: EmbedConfig) -> int:
    if ecfg.max_steps:
        return ecfg.max_steps
    return max(1, math.floor(ecfg.num_train_epochs * steps_per_epoch(n_triplets_per_worker, ecfg)))


def group_passages(batch: dict, group_size: int, rng: random.Random) -> list[str]:
    """[pos_0, neg_0..., pos_1, neg_1...]: each query's positive then group_size-1 sampled negatives."""
    out: list[str] = []
    for pos, neg in zip(batch["pos"], batch["neg"]):
        negs = list(neg)
        picked = rng.sample(negs, group_size - 1) if len(negs) >= group_size - 1 else \
            [negs[rng.randrange(len(negs))] for _ in range(group_size - 1)]
        out.extend([str(pos[0]), *map(str, picked)])
    return out


def retrieval_validation(model, tok, val: dict, ecfg: EmbedConfig, device) -> dict:
    """recall@1 / MRR@k / nDCG@k of the current model on the validation pairs (the embedding
    recipe scores on rank 0, LSR on every rank)."""
    import torch

    from ray_ft.metrics.retriever import evaluate_retriever

    inner = model.module if hasattr(model, "module") else model

    def embed(texts: list[str]):
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), 64):
                enc = tok(texts[i:i + 64], padding=True, truncation=True,
                          max_length=ecfg.passage_max_len, return_tensors="pt")
                out.append(inner({k: v.to(device) for k, v in enc.items()}).float().cpu())
        return torch.cat(out).numpy()

    inner.eval()
    try:
        got = evaluate_retriever(embed, val["questions"], val["contexts"], ecfg.eval_top_k,
                                 ecfg.sentence_splitter, ecfg.recall_threshold, ecfg.query_instruction)
    finally:
        inner.train()
    return {f"val_{k}": v for k, v in got.items() if k not in {"n_queries", "n_passages"}}


def start_embed_worker(loop_config: dict) -> tuple[EmbedConfig, int, int]:
    """On a Ray Train worker of an embedder recipe: `embed.*` re-validated, this rank and the
    world size; torch's CPU threads set to the worker's CPUs, torch seeded."""
    import ray.train
    import torch

    ecfg = JobConfig.model_validate(loop_config["job"]).embed
    ctx = ray.train.get_context()
    if not ecfg.use_gpu:
        torch.set_num_threads(max(1, int(ecfg.cpus_per_worker)))
    torch.manual_seed(ecfg.seed)  # same initial weights on every worker (DDP broadcasts anyway)
    return ecfg, ctx.get_world_rank(), ctx.get_world_size()


def step_settings(ecfg: EmbedConfig) -> TrainConfig:
    """The contrastive recipe's optimizer and schedule in the form the shared stepper reads: a full
    fine-tune in fp32, AdamW (torch's default weight decay 0.01), linear schedule, clipped at 1.0."""
    return TrainConfig(
        finetuning_type="full", learning_rate=ecfg.learning_rate, warmup_ratio=ecfg.warmup_ratio,
        weight_decay=0.01, lr_scheduler_type="linear", max_grad_norm=1.0, precision="fp32",
        num_workers=ecfg.num_workers, use_gpu=ecfg.use_gpu, cpus_per_worker=ecfg.cpus_per_worker, seed=ecfg.seed,
        eval_every_n_steps=ecfg.eval_every_n_steps, tensorboard=False)


class Backpropagated:
    """A micro-batch loss whose backward pass the recipe already ran (GradCache replays the
    encoder chunk by chunk): the loop's `backward` has nothing left to do, `item` is the value."""

    def __init__(self, value):
        self.value = value

    def backward(self) -> None:
        pass

    def item(self) -> float:
        return self.value.item()


def contrastive_objective(ecfg: EmbedConfig):
    """The stepper's `loss_of`: queries and passages through the encoder -> InfoNCE (cross-device
    negatives when configured); through GradCache, whose backward runs here, when chunked."""
    from ray_ft.train.contrastive import cross_device_loss, grad_cache_backward, info_nce

    def loss_fn(q, p):
        if ecfg.negatives_cross_device:
            return cross_device_loss(q, p, ecfg.temperature)
        return info_nce(q, p, ecfg.temperature)

    def loss_of(model, inputs: dict):
        if ecfg.grad_cache_chunk_size:
            return Backpropagated(grad_cache_backward(model, inputs["q"], inputs["p"], ecfg.grad_cache_chunk_size,
                                                      loss_fn, getattr(model, "no_sync", None)))
        return loss_fn(model(inputs["q"]), model(inputs["p"]))

    return loss_of


class EncoderSteps:
    """What the sentence-encoder recipes' loop parts share (contrastive here, LSR): the shard,
    tokenizing onto the device, and a checkpoint's sentence-transformers folder (rank 0)."""

    def __init__(self, shard, tok, ecfg: EmbedConfig, val: dict | None, base_dir: Path, rank: int, device):
        self.shard, self.tok, self.ecfg, self.val = shard, tok, ecfg, val
        self.base_dir, self.rank, self.device = base_dir, rank, device

    def tokenize(self, texts: list[str], max_len: int) -> dict:
        enc = self.tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def save(self, stepper, folder: Path) -> None:
        if self.rank == 0:
            (folder / "model").mkdir(parents=True, exist_ok=True)
            write_sentence_transformer(stepper.module, self.tok, self.base_dir, folder / "model", self.ecfg.pooling)


def resume_encoder(start: str, ecfg: EmbedConfig, tcfg: TrainConfig, n_steps: int, loss_of):
    """(encoder, TorchStepper, LoopState) of a sentence-encoder recipe's worker: fresh from
    `start`, or, after a restart, the latest checkpoint's weights (loaded before DDP wraps them),
    optimizer, scheduler and loop state."""
    from safetensors.torch import load_file

    from ray_ft.train.steppers import TorchStepper

    encoder = SentenceEncoder.build(start, ecfg.pooling)
    with latest_checkpoint() as ckpt:
        if ckpt is not None:
            encoder.model.load_state_dict(load_file(str(ckpt / "model" / "model.safetensors")))
        stepper = TorchStepper(encoder, tcfg, n_steps, loss_of=loss_of)
        return encoder, stepper, restore(stepper, ckpt)


def encoder_schedule(ecfg: EmbedConfig, encoder, n_steps: int, per_epoch: int, eval_every: int | None,
                     metric: str, tag: str) -> Schedule:
    """The loop schedule of a sentence-encoder recipe: no accumulation, a row per step, full
    fine-tune FLOPs (6N per token)."""
    num_params = sum(p.numel() for p in encoder.parameters())
    return Schedule(
        n_steps=n_steps, per_epoch=per_epoch, accumulation=1, eval_every=eval_every, log_every=1, metric=metric,
        patience=None, seed=ecfg.seed, flops_per_token=tm.flops_per_token(num_params, "full"),
        peak_tflops=tm.peak_tflops(ecfg.use_gpu), use_gpu=ecfg.use_gpu, micro_steps=False, all_ranks_save=False,
        tag=tag)


class ContrastiveSteps(EncoderSteps):
    """The embedding recipe's part of the step loop: triplet batches with seeded negatives, the
    InfoNCE loss, retrieval validation on the held-out pairs."""

    def micro_batches(self):
        return self.shard.iter_batches(batch_size=self.ecfg.per_device_batch_size, drop_last=True)

    def losses(self, stepper, group: list):
        import torch

        e = self.ecfg
        for batch in group:
            # The loop seeded torch with this step's seed: the negatives drawn from it are the ones
            # a resumed run draws.
            queries = [e.query_instruction + str(q) for q in batch["query"]]
            passages = group_passages(batch, e.train_group_size, random.Random(torch.initial_seed()))
            q_in, p_in = self.tokenize(queries, e.query_max_len), self.tokenize(passages, e.passage_max_len)
            loss = stepper.forward({"q": q_in, "p": p_in})
            masks = (q_in["attention_mask"], p_in["attention_mask"])
            yield loss, Counts(int(sum(m.sum() for m in masks)), sum(m.numel() for m in masks), len(queries))

    def validate(self, stepper) -> dict:
        # Rank 0 only: nothing here stops early, and the checkpoint Ray Train keeps is picked by
        # rank 0's reported score.
        if self.rank != 0 or not self.val:
            return {}
        return retrieval_validation(stepper.module, self.tok, self.val, self.ecfg, self.device)


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    ecfg, rank, world = start_embed_worker(loop_config)
    start = loop_config["model_dir"]
    tok = AutoTokenizer.from_pretrained(start)
    tok.padding_side = "right"  # GradCache trims each chunk's trailing padding
    per_worker = loop_config["triplets_per_worker"]
    n_steps = total_steps(per_worker, ecfg)
    encoder, stepper, state = resume_encoder(start, ecfg, step_settings(ecfg), n_steps, contrastive_objective(ecfg))
    device = ray.train.torch.get_device()
    steps = ContrastiveSteps(ray.train.get_dataset_shard("train"), tok, ecfg, loop_config.get("val"), Path(start),
                             rank, device)
    sched = encoder_schedule(ecfg, encoder, n_steps, steps_per_epoch(per_worker, ecfg), ecfg.eval_every_n_steps,
                             f"val_mrr_at_{ecfg.eval_top_k}", "embed")
    run_steps(steps, stepper, sched, state, rank, world, device, step_writer(loop_config, rank),
              loop_config.get("test_faults"))


def write_sentence_transformer(model, tok, base_dir: Path, out: Path, pooling: str) -> None:
    """The base folder's sentence-transformers modules with the trained encoder and pooling."""
    inner = model.module if hasattr(model, "module") else model
    # Only the sentence-transformers description and its module folders: a base folder may also
    # hold other weight formats (onnx/, openvino/, tf_model.h5) that would silently be stale.
    for name in ("modules.json", "sentence_bert_config.json", "config_sentence_transformers.json"):
        if (base_dir / name).is_file():
            shutil.copy2(base_dir / name, out / name)
    if (base_dir / "modules.json").is_file():
        for module in json.loads((base_dir / "modules.json").read_text()):
            src = base_dir / module.get("path", "")
            if module.get("path") and src.is_dir():
                shutil.copytree(src, out / module["path"])
    inner.model.save_pretrained(out)
    tok.save_pretrained(out)
    pool_cfg = out / "1_Pooling" / "config.json"
    if pool_cfg.is_file():
        cfg = json.loads(pool_cfg.read_text())
        cfg.update(pooling_mode_cls_token=pooling == "cls", pooling_mode_mean_tokens=pooling == "mean")
        pool_cfg.write_text(json.dumps(cfg, indent=2))


def write_triplets(triplets: list[dict], out_dir: Path) -> Path:
    """The training triplets as one parquet file (rows in the given order) for Ray Data to read:
    a file in the run folder rather than objects owned by the driver process, so workers of a
    cluster (and a restarted worker group) read the same input the way the SFT trainer does."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {"query": [t["query"] for t in triplets], "pos": [list(t["pos"]) for t in triplets],
            "neg": [list(t["neg"]) for t in triplets]}
    path = out_dir / "train_triplets.parquet"
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(cols), tmp)
    tmp.replace(path)
    return path


def run_embed_training(cfg: JobConfig, triplets: list[dict], model_dir: Path, out_dir: Path,
                       val: dict | None = None, resume: bool = True) -> EmbedTrainResult:
    """Fit on Ray Train; the best (by validation MRR, else the last) sentence-transformers folder
    lands in `out_dir/model`. `val` = {"questions", "contexts"} scored every
    `embed.eval_every_n_steps` and at the end. A run of the same config, data and model that
    stopped before the end continues from its latest checkpoint (`resume=False`: from step 0)."""
    import ray

    ecfg = cfg.embed
    per_worker = len(triplets) // ecfg.num_workers
    if per_worker < ecfg.per_device_batch_size:
        raise RayFTError(f"embed.per_device_batch_size: {len(triplets)} triplets cannot fill a batch of "
                         f"{ecfg.per_device_batch_size} "
                         f"on each of {ecfg.num_workers} workers")
    out_dir.mkdir(parents=True, exist_ok=True)
    score = f"val_mrr_at_{ecfg.eval_top_k}" if val else None
    triplets_key = hashlib.sha256(json.dumps(triplets, sort_keys=True).encode()).hexdigest()
    spec = Launch(
        train_loop_per_worker,
        loop_config={"job": cfg.model_dump(), "model_dir": str(model_dir), "triplets_per_worker": per_worker,
                     "val": val},
        workers=Workers(ecfg.num_workers, ecfg.use_gpu, ecfg.cpus_per_worker),
        run_prefix="embed",
        # embed.lsr is a later step of the stage: changing it does not retrain the contrastive part.
        identity={"embed": ecfg.model_dump(exclude={"lsr"}), "triplets": triplets_key, "val": val, "model": str(model_dir)},
        datasets={"train": ray.data.read_parquet(str(write_triplets(triplets, out_dir).resolve()))},
        export_name="model", keep_checkpoints=ecfg.keep_checkpoints, max_failures=ecfg.max_failures,
        best_by=score, best_mode="max", subdir="model")
    final, history, chosen = launch(spec, out_dir, resume)
    return EmbedTrainResult(final, history, chosen.get("step"))
