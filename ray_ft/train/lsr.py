"""LM-supervised retrieval (RA-DIT's retriever half) on Ray Train, on the shared step loop.

Each worker reads its shard of scored questions (`ray_ft.data.lsr`: a question, its k candidate
passages from the embedder it starts from, the generator's score of the reference answer given
each), embeds the question and the candidates with the sentence encoder and minimises
KL(p_LM || p_R) over each question's candidates (`contrastive.lsr_loss`), optionally mixed with
InfoNCE on the question's own passage. Validation is the embedding recipe's (MRR@k over held-out
questions and their passages); the best checkpoint is exported as a sentence-transformers folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ray_ft.config import EmbedConfig, JobConfig, TrainConfig
from ray_ft.errors import RayFTError
from ray_ft.train.embed import (
    EncoderSteps, encoder_schedule, resume_encoder, retrieval_validation, start_embed_worker,
)
from ray_ft.train.launch import Launch, Workers, launch
from ray_ft.train.loop import Counts, run_steps, step_writer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LSRTrainResult:
    model_dir: Path
    history: list[dict]
    best_step: int | None  # the step whose checkpoint was exported


def val_metric(ecfg: EmbedConfig) -> str:
    return f"val_mrr_at_{ecfg.eval_top_k}"


def step_settings(ecfg: EmbedConfig) -> TrainConfig:
    """LSR's optimizer and schedule in the form the shared stepper reads: a full fine-tune in
    fp32 (as the contrastive recipe), linear schedule, clipped at 1.0."""
    lcfg = ecfg.lsr
    return TrainConfig(
        finetuning_type="full", learning_rate=lcfg.learning_rate, warmup_ratio=lcfg.warmup_ratio,
        weight_decay=0.01, lr_scheduler_type="linear", max_grad_norm=1.0, precision="fp32",
        num_workers=ecfg.num_workers, use_gpu=ecfg.use_gpu, cpus_per_worker=ecfg.cpus_per_worker, seed=ecfg.seed,
        eval_every_n_steps=lcfg.eval_every_n_steps, tensorboard=False)


def total_steps(questions_per_worker: int, ecfg: EmbedConfig) -> int:
    lcfg = ecfg.lsr
    per_epoch = max(1, questions_per_worker // lcfg.per_device_batch_size)
    return lcfg.max_steps or max(1, round(lcfg.num_train_epochs * per_epoch))


def lsr_objective(ecfg: EmbedConfig):
    """The stepper's `loss_of`: encoder -> KL to the LM's distribution (+ weighted gold InfoNCE)."""
    from ray_ft.train.contrastive import gold_info_nce, lsr_loss

    lcfg = ecfg.lsr
    temperature = lcfg.retriever_temperature or ecfg.temperature

    def loss_of(model, inputs: dict):
        import torch

        q = model(inputs["q"])
        p = torch.cat([model(chunk) for chunk in inputs["p_chunks"]])[inputs["p_order"]]
        loss = lsr_loss(q, p, inputs["lm_scores"], temperature, lcfg.lm_temperature)
        if lcfg.contrastive_weight:
            loss = loss + lcfg.contrastive_weight * gold_info_nce(q, p, inputs["gold_index"], temperature)
        return loss

    return loss_of


class LSRSteps(EncoderSteps):
    """LSR's part of the step loop: questions with their scored candidates, the KL loss, the
    embedding recipe's retrieval validation."""

    def micro_batches(self):
        return self.shard.iter_batches(batch_size=self.ecfg.lsr.per_device_batch_size, drop_last=True)

    def length_chunks(self, texts: list[str], max_len: int, size: int = 32):
        """The texts tokenized in chunks of similar length, each padded to its own longest, and
        the permutation that puts their embeddings back in order: a question's k candidates
        padded to the batch's longest passage were ~75% padding (measured on Financial-QA)."""
        import torch

        ids = self.tok(texts, truncation=True, max_length=max_len)["input_ids"]
        order = sorted(range(len(texts)), key=lambda i: len(ids[i]))
        chunks = []
        for start in range(0, len(order), size):
            part = self.tok.pad({"input_ids": [ids[i] for i in order[start:start + size]]}, return_tensors="pt")
            chunks.append({k: v.to(self.device) for k, v in part.items()})
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        return chunks, inverse.to(self.device)

    def losses(self, stepper, group: list):
        import torch

        e = self.ecfg
        for batch in group:
            queries = [e.query_instruction + str(q) for q in batch["query"]]
            passages = [str(c) for row in batch["candidates"] for c in row]
            q_in = self.tokenize(queries, e.query_max_len)
            p_chunks, p_order = self.length_chunks(passages, e.passage_max_len)
            inputs = {"q": q_in, "p_chunks": p_chunks, "p_order": p_order,
                      "lm_scores": torch.tensor([list(s) for s in batch["lm_scores"]], dtype=torch.float32,
                                                device=self.device),
                      "gold_index": torch.tensor([int(i) for i in batch["gold_index"]], device=self.device)}
            loss = stepper.forward(inputs)
            masks = [q_in["attention_mask"], *(c["attention_mask"] for c in p_chunks)]
            tokens, slots = int(sum(m.sum() for m in masks)), sum(m.numel() for m in masks)
            yield loss, Counts(tokens, slots, len(queries))

    def validate(self, stepper) -> dict:
        # Every rank scores the same (small) validation set, so all agree on best and stop.
        return retrieval_validation(stepper.module, self.tok, self.val, self.ecfg, self.device) if self.val else {}


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    ecfg, rank, world = start_embed_worker(loop_config)
    start = loop_config["model_dir"]
    tok = AutoTokenizer.from_pretrained(start)
    per_worker = loop_config["questions_per_worker"]
    n_steps, per_epoch = total_steps(per_worker, ecfg), max(1, per_worker // ecfg.lsr.per_device_batch_size)
    encoder, stepper, state = resume_encoder(start, ecfg, step_settings(ecfg), n_steps, lsr_objective(ecfg))
    device = ray.train.torch.get_device()
    steps = LSRSteps(ray.train.get_dataset_shard("train"), tok, ecfg, loop_config.get("val"), Path(start), rank,
                     device)
    sched = encoder_schedule(ecfg, encoder, n_steps, per_epoch, ecfg.lsr.eval_every_n_steps, val_metric(ecfg), "lsr")
    run_steps(steps, stepper, sched, state, rank, world, device, step_writer(loop_config, rank),
              loop_config.get("test_faults"))


def write_questions(table: list[dict], out_dir: Path) -> Path:
    from ray_ft.data.lsr import write_parquet_atomic

    return write_parquet_atomic(table, out_dir / "train_questions.parquet")


def run_lsr_training(cfg: JobConfig, table: list[dict], start_dir: Path, out_dir: Path, val: dict | None = None,
                     resume: bool = True) -> LSRTrainResult:
    """Fit on Ray Train from the embedder in `start_dir` on `table` (`ray_ft.data.lsr.training_table`);
    the best (by validation MRR, else the last) sentence-transformers folder lands in
    `out_dir/model`. A stopped run of the same config, data and start continues from its latest
    checkpoint (`resume=False`: from step 0)."""
    import ray

    ecfg = cfg.embed
    start_dir = Path(start_dir).resolve()  # workers run elsewhere: a relative run folder would not resolve
    per_worker = len(table) // ecfg.num_workers
    if per_worker < ecfg.lsr.per_device_batch_size:
        raise RayFTError(f"embed.lsr.per_device_batch_size: {len(table)} scored questions cannot fill a batch of "
                         f"{ecfg.lsr.per_device_batch_size} on each of {ecfg.num_workers} workers")
    out_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(json.dumps([table, val], sort_keys=True).encode()).hexdigest()
    spec = Launch(
        train_loop_per_worker,
        loop_config={"job": cfg.model_dump(), "model_dir": str(start_dir), "questions_per_worker": per_worker,
                     "val": val},
        workers=Workers(ecfg.num_workers, ecfg.use_gpu, ecfg.cpus_per_worker),
        run_prefix="lsr",
        identity={"embed": ecfg.model_dump(), "data": key, "model": str(start_dir)},
        datasets={"train": ray.data.read_parquet(str(write_questions(table, out_dir).resolve()))},
        export_name="model", keep_checkpoints=ecfg.keep_checkpoints, max_failures=ecfg.max_failures,
        best_by=val_metric(ecfg) if val else None, best_mode="max", subdir="model")
    final, history, chosen = launch(spec, out_dir, resume)
    return LSRTrainResult(final, history, chosen.get("step"))
