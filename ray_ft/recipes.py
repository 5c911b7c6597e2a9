"""The registry of training recipes: one entry per method, naming the function that runs it.

Like torchtune's recipe registry, it imports no recipe code, so the config (the lowest layer)
validates `train.method` against it and `ray-ft recipes` lists it without loading torch. A new
method is one recipe module under `ray_ft/train/` plus one entry here. Every LLM recipe's entry
has the signature of `ray_ft.train.sft.run_training`:

    run(cfg: JobConfig, prepared: PreparedData, model_dir: Path, out_dir: Path, resume: bool) -> TrainResult
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    name: str
    entry: str  # "module:function"
    selected_by: str  # the config that picks it
    description: str

    def load(self):
        module, function = self.entry.split(":")
        return getattr(importlib.import_module(module), function)


_ALL = (
    Recipe("sft", "ray_ft.train.sft:run_training", "train.method: sft",
           "supervised fine-tuning on the prepared shards (lora, freeze or full; DDP or ZeRO-2/3)"),
    Recipe("dpo", "ray_ft.train.dpo:run_preference", "train.method: dpo",
           "direct preference optimisation on train.preference.source pairs; the reference is the "
           "base with the LoRA adapter disabled"),
    Recipe("orpo", "ray_ft.train.dpo:run_preference", "train.method: orpo",
           "odds-ratio preference optimisation (NLL of chosen + odds-ratio term), no reference model"),
    Recipe("embedding", "ray_ft.train.embed:run_embed_training", "task: embedding (or embed.enabled)",
           "contrastive InfoNCE fine-tuning of the sentence-transformers embedder"),
    Recipe("rerank", "ray_ft.train.rerank:run_rerank_training", "task: rerank (or rerank.enabled)",
           "listwise softmax training of a cross-encoder reranker on the embedding triplets' hard negatives"),
)
RECIPES: dict[str, Recipe] = {r.name: r for r in _ALL}
PREFERENCE_RECIPES = ("dpo", "orpo")  # learn from train.preference.source pairs, not the SFT shards
LLM_RECIPES = tuple(name for name, r in RECIPES.items() if r.selected_by.startswith("train.method"))
