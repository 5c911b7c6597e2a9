"""Contrastive fine-tuning of a sentence-transformers embedder on Ray Train.

Each worker reads its shard of FlagEmbedding-format triplets (`ray.train.get_dataset_shard`),
samples `train_group_size - 1` of each query's stored negatives per step (seeded), embeds
queries (with the instruction prefix) and passages with the model, and minimizes InfoNCE with
in-batch and, across workers, cross-device negatives (`ray_ft.train.contrastive`), optionally
through GradCache. The final checkpoint is a complete sentence-transformers folder (the base
folder's modules with the trained weights), loadable by sentence-transformers and FlagEmbedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ray_ft.config import EmbedConfig, JobConfig
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl
from ray_ft.train import metrics as tm
from ray_ft.train import faults
from ray_ft.train.checkpoints import HISTORY_FILE, report_checkpoint
from ray_ft.train.launch import Launch, Workers, launch
from ray_ft.train.loop import step_seed
from ray_ft.train.steppers import TRAINER_STATE

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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from transformers import AutoTokenizer, get_scheduler

    from ray_ft.train.contrastive import cross_device_loss, grad_cache_backward, info_nce

    ecfg, rank, world = start_embed_worker(loop_config)

    tok = AutoTokenizer.from_pretrained(loop_config["model_dir"])
    tok.padding_side = "right"  # GradCache trims each chunk's trailing padding
    encoder = SentenceEncoder.build(loop_config["model_dir"], ecfg.pooling)
    optim = torch.optim.AdamW(encoder.parameters(), lr=ecfg.learning_rate)
    n_steps = total_steps(loop_config["triplets_per_worker"], ecfg)
    per_epoch = steps_per_epoch(loop_config["triplets_per_worker"], ecfg)
    sched = get_scheduler("linear", optim, math.ceil(ecfg.warmup_ratio * n_steps), n_steps)
    step, history = _resume(encoder, optim, sched)
    model = ray.train.torch.prepare_model(encoder)
    device = ray.train.torch.get_device()

    def loss_fn(q, p):
        if ecfg.negatives_cross_device:
            return cross_device_loss(q, p, ecfg.temperature)
        return info_nce(q, p, ecfg.temperature)

    def tokenize(texts: list[str], max_len: int) -> dict:
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    def save(folder: Path) -> None:
        write_sentence_transformer(model, tok, Path(loop_config["model_dir"]), folder, ecfg.pooling)
        torch.save({"step": step, "optim": optim.state_dict(), "sched": sched.state_dict()},
                   folder / TRAINER_STATE)

    shard = ray.train.get_dataset_shard("train")
    t0 = time.perf_counter()
    model.train()
    while step < n_steps:
        skip = step % per_epoch  # batches of this epoch a resumed run has already trained on
        for i, batch in enumerate(shard.iter_batches(batch_size=ecfg.per_device_batch_size, drop_last=True)):
            if i < skip:
                continue
            if i >= per_epoch:
                break
            seed = step_seed(ecfg.seed, rank, step)  # negatives and dropout: a resumed run draws the same
            torch.manual_seed(seed)
            queries = [ecfg.query_instruction + str(q) for q in batch["query"]]
            passages = group_passages(batch, ecfg.train_group_size, random.Random(seed))
            q_in, p_in = tokenize(queries, ecfg.query_max_len), tokenize(passages, ecfg.passage_max_len)
            if ecfg.grad_cache_chunk_size:
                loss = grad_cache_backward(model, q_in, p_in, ecfg.grad_cache_chunk_size, loss_fn,
                                           getattr(model, "no_sync", None))
            else:
                loss = loss_fn(model(q_in), model(p_in))
                loss.backward()
                loss = loss.detach()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optim.step()
            sched.step()
            optim.zero_grad(set_to_none=True)
            step += 1
            dt = time.perf_counter() - t0
            # cross_device_loss is scaled by the world size for the backward pass; log the loss.
            value = loss.item() / (world if ecfg.negatives_cross_device and world > 1 else 1)
            stats = tm.sum_over_ranks(torch.tensor([value, len(queries) + len(passages)], dtype=torch.float64),
                                      device)
            row = {"step": step, "loss": stats[0].item() / world, "lr": sched.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "sentences_per_s": stats[1].item() / dt,
                   "peak_mem_mb": tm.peak_memory_mb(ecfg.use_gpu), "step_time_s": dt}
            evaluate = step == n_steps or bool(ecfg.eval_every_n_steps and step % ecfg.eval_every_n_steps == 0)
            if evaluate and rank == 0 and loop_config.get("val"):
                row.update(retrieval_validation(model, tok, loop_config["val"], ecfg, device))
            history.append(row)
            if rank == 0:
                log.info("[embed] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            faults.maybe_fail(loop_config.get("test_faults"), step, rank)
            if evaluate:
                report_checkpoint(history, rank, save)  # CheckpointConfig keeps the best ones
            else:
                ray.train.report(row)
            t0 = time.perf_counter()
            if step == n_steps:
                break


def _resume(encoder, optim, sched) -> tuple[int, list[dict]]:
    """Restore weights, optimizer, scheduler, step and history from Ray Train's latest checkpoint
    (after a worker failure, with FailureConfig); (0, []) on a fresh start."""
    import ray.train
    import torch
    from safetensors.torch import load_file

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return 0, []
    with ckpt.as_directory() as d:
        d = Path(d)
        encoder.model.load_state_dict(load_file(str(d / "model.safetensors")))
        state = torch.load(d / TRAINER_STATE, weights_only=False)
        optim.load_state_dict(state["optim"])
        sched.load_state_dict(state["sched"])
        history = read_jsonl(d / HISTORY_FILE)
    log.info("[embed] resumed from %s at step %d", ckpt.path, state["step"])
    return state["step"], history


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
        best_by=score, best_mode="max", drop=(TRAINER_STATE,))
    final, history, chosen = launch(spec, out_dir, resume)
    return EmbedTrainResult(final, history, chosen.get("step"))
