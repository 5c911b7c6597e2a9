"""Contrastive fine-tuning of a sentence-transformers embedder on Ray Train.

Each worker reads its shard of FlagEmbedding-format triplets (`ray.train.get_dataset_shard`),
samples `train_group_size - 1` of each query's stored negatives per step (seeded), embeds
queries (with the instruction prefix) and passages with the model, and minimizes InfoNCE with
in-batch and, across workers, cross-device negatives (`ray_ft.train.contrastive`), optionally
through GradCache. The final checkpoint is a complete sentence-transformers folder (the base
folder's modules with the trained weights), loadable by sentence-transformers and FlagEmbedding.
"""

from __future__ import annotations

import json
import logging
import math
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from ray_ft.config import EmbedConfig, JobConfig
from ray_ft.train import metrics as tm

log = logging.getLogger(__name__)
HISTORY_FILE = "ray_ft_history.jsonl"


@dataclass(frozen=True)
class EmbedTrainResult:
    model_dir: Path
    history: list[dict]


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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist
    from transformers import AutoTokenizer, get_scheduler

    from ray_ft.train.contrastive import cross_device_loss, grad_cache_backward, info_nce

    job = JobConfig.model_validate(loop_config["job"])
    ecfg = job.embed
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not ecfg.use_gpu:
        torch.set_num_threads(max(1, int(ecfg.cpus_per_worker)))
    torch.manual_seed(ecfg.seed + rank)
    rng = random.Random(ecfg.seed * 1000 + rank)

    tok = AutoTokenizer.from_pretrained(loop_config["model_dir"])
    tok.padding_side = "right"  # GradCache trims each chunk's trailing padding
    model = ray.train.torch.prepare_model(SentenceEncoder.build(loop_config["model_dir"], ecfg.pooling))
    device = ray.train.torch.get_device()
    optim = torch.optim.AdamW(model.parameters(), lr=ecfg.learning_rate)
    n_steps = total_steps(loop_config["triplets_per_worker"], ecfg)
    sched = get_scheduler("linear", optim, math.ceil(ecfg.warmup_ratio * n_steps), n_steps)

    def loss_fn(q, p):
        if ecfg.negatives_cross_device:
            return cross_device_loss(q, p, ecfg.temperature)
        return info_nce(q, p, ecfg.temperature)

    def tokenize(texts: list[str], max_len: int) -> dict:
        enc = tok(texts, padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return {k: v.to(device) for k, v in enc.items()}

    history: list[dict] = []
    shard = ray.train.get_dataset_shard("train")
    step, t0 = 0, time.perf_counter()
    model.train()
    while step < n_steps:
        for batch in shard.iter_batches(batch_size=ecfg.per_device_batch_size, drop_last=True):
            queries = [ecfg.query_instruction + str(q) for q in batch["query"]]
            passages = group_passages(batch, ecfg.train_group_size, rng)
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
            stats = torch.tensor([value, len(queries) + len(passages)], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(stats)
            row = {"step": step, "loss": stats[0].item() / world, "lr": sched.get_last_lr()[0],
                   "grad_norm": float(grad_norm), "sentences_per_s": stats[1].item() / dt,
                   "peak_mem_mb": tm.peak_memory_mb(ecfg.use_gpu), "step_time_s": dt}
            history.append(row)
            if rank == 0:
                log.info("[embed] " + " ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
            if step == n_steps:
                _report_final(model, tok, history, rank, loop_config["model_dir"], ecfg.pooling)
                break
            ray.train.report(row)
            t0 = time.perf_counter()


def _report_final(model, tok, history, rank, base_dir: str, pooling: str) -> None:
    import ray.train

    if rank != 0:
        ray.train.report(history[-1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        write_sentence_transformer(model, tok, Path(base_dir), Path(tmp), pooling)
        Path(tmp, HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(tmp))


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


def run_embed_training(cfg: JobConfig, triplets: list[dict], model_dir: Path, out_dir: Path) -> EmbedTrainResult:
    """Fit on Ray Train; the trained sentence-transformers folder lands in `out_dir/model`."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from ray_ft.train.sft import _ordered_ingest

    ecfg = cfg.embed
    per_worker = len(triplets) // ecfg.num_workers
    if per_worker < ecfg.per_device_batch_size:
        raise ValueError(f"{len(triplets)} triplets cannot fill a batch of {ecfg.per_device_batch_size} "
                         f"on each of {ecfg.num_workers} workers")
    out_dir.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": cfg.model_dump(), "model_dir": str(model_dir),
                           "triplets_per_worker": per_worker},
        scaling_config=ScalingConfig(
            num_workers=ecfg.num_workers, use_gpu=ecfg.use_gpu,
            resources_per_worker={"CPU": ecfg.cpus_per_worker} if not ecfg.use_gpu else None),
        run_config=RunConfig(name=f"embed_{time.strftime('%Y%m%d_%H%M%S')}",
                             storage_path=str((out_dir / "ray").resolve())),
        datasets={"train": ray.data.from_items(triplets)},
        dataset_config=_ordered_ingest(),
    )
    result = trainer.fit()
    if result.error:
        raise result.error
    final = out_dir / "model"
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".model."))
    result.checkpoint.to_directory(str(tmp))
    history = [json.loads(line) for line in (tmp / HISTORY_FILE).read_text().splitlines()]
    (tmp / HISTORY_FILE).unlink()
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return EmbedTrainResult(final, history)
