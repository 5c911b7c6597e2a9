"""Which stages of `ray-ft run` can be skipped: a record per stage of the config hash it ran with.

`run_dir/stages.json` holds, per finished stage, the hash of everything that stage depends on (its
config sections and the hashes of the stages it reads from) and its outputs. A stage is skipped
when its hash is unchanged, its outputs still exist, it is not forced, and no stage it reads from
ran again in this invocation. A stage's record is written only after it completed, so an
interrupted run resumes at the stage that did not finish.

The stages and what each reads (`stage_inputs`): embed (optional) -> prepare (only when its
retrieval-augmented examples use the fine-tuned embedder) -> train -> eval (serves the adapter and
the embedder) -> pairs (optional, `train.preference.mining.enabled`: serves the adapter again and
mines preference pairs from its answers to training questions). Hashes are computed when asked, after the stages before have run: prepare's hash
covers the fine-tuned embedder's files, which the embed stage may just have rewritten.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import ray_ft
from ray_ft.config import JobConfig
from ray_ft.io import write_text_atomic

STAGES = ("embed", "rerank", "prepare", "train", "eval", "pairs")
STATE_FILE = "stages.json"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_inputs(cfg: JobConfig) -> dict[str, tuple[str, ...]]:
    """The stages each stage of this job reads from (embed only when it is part of the job)."""
    embed = ("embed",) if cfg.embed.enabled else ()
    # eval serves the job's own reranker only when serve.rerank names no other one
    rerank = ("rerank",) if cfg.trains_reranker and cfg.serve.rerank.enabled and not cfg.serve.rerank.model else ()
    return {"embed": (), "rerank": embed, "prepare": embed if cfg.data.retrieval_augment.enabled else (),
            "train": ("prepare",), "eval": ("train", *embed, *rerank), "pairs": ("train",)}


def lsr_lm_key(cfg: JobConfig) -> dict:
    """What else LSR's scores depend on: the LM (the job's model by default) and its prompt."""
    lsr = cfg.embed.lsr
    if not lsr.enabled:
        return {}
    return {"lsr_lm": [lsr.lm or cfg.model.name, cfg.data.language, cfg.model.system_prompt,
                       cfg.serve.system_prompt, cfg.serve.prompt_template, cfg.data.prompt_template]}


def train_config_key(cfg: JobConfig) -> dict:
    """The train config, and the pairs file's content for a preference recipe."""
    from ray_ft.data.sources import source_fingerprint

    # Mining is the pairs stage's config; the pairs a preference recipe reads are its input.
    key: dict = cfg.train.model_dump(exclude={"preference": {"mining"}} if cfg.train.is_preference else {"preference"})
    if cfg.train.is_preference:
        key = {"train": key, "pairs": hashlib.sha256(source_fingerprint(cfg.train.preference.source)).hexdigest()}
    return key


def stage_hash(cfg: JobConfig, stage: str, memo: dict[str, str] | None = None) -> str:
    """The stage's own config (and input files) chained with the hashes of the stages it reads.
    `memo` keeps hashes already computed (each reads the data source's bytes or a model's file
    list), so a stage read by several others is hashed once."""
    from ray_ft.data.embed_data import embed_config_hash
    from ray_ft.data.prepare import data_config_hash

    memo = {} if memo is None else memo
    if stage in memo:
        return memo[stage]
    upstream = {s: stage_hash(cfg, s, memo) for s in stage_inputs(cfg)[stage]}
    own = {
        "embed": lambda: {"embed": cfg.embed.model_dump(), "data": embed_config_hash(cfg), **lsr_lm_key(cfg)},
        # the first stage that fetches its validation and test candidates, too
        "rerank": lambda: {"rerank": cfg.rerank.model_dump(), "data": embed_config_hash(cfg),
                           "first_stage": [cfg.serve.embedder, cfg.serve.retrieval.query_instruction]},
        "prepare": lambda: data_config_hash(cfg),  # data + model config, source bytes, embedder files
        "train": lambda: train_config_key(cfg),
        # Models named by path are read by eval too: a re-trained adapter there means new numbers.
        "eval": lambda: {"serve": cfg.serve.model_dump(), "eval": cfg.eval.model_dump(),
                         "models": served_model_fingerprints(cfg)},
        "pairs": lambda: {"mining": cfg.train.preference.mining.model_dump(exclude={"enabled"}),
                          "serve": cfg.serve.model_dump()},
    }[stage]()
    # The package version too: outputs written by another release of ray_ft are never reused.
    memo[stage] = _digest({"own": own, "ray_ft": ray_ft.__version__, **upstream})
    return memo[stage]


def served_model_fingerprints(cfg: JobConfig) -> str:
    """Digest of the folders eval serves from outside the run: eval.adapters, serve.models and
    serve.embedder, serve.rerank.model (names only for packaged models and URIs)."""
    from ray_ft.data.sources import folder_fingerprint

    h = hashlib.sha256()
    given = [cfg.serve.rerank.model] if cfg.serve.rerank.model else []
    for path in [*cfg.eval.adapters.values(), *cfg.serve.models.values(), cfg.serve.embedder, *given]:
        h.update(hashlib.sha256(folder_fingerprint(path)).digest())
    return h.hexdigest()


def stage_hashes(cfg: JobConfig) -> dict[str, str]:
    memo: dict[str, str] = {}
    return {s: stage_hash(cfg, s, memo) for s in STAGES}


class StageLog:
    """The stages.json of one run folder."""

    def __init__(self, run_dir: Path, cfg: JobConfig, force: set[str] | frozenset[str] = frozenset()):
        unknown = set(force) - set(STAGES)
        if unknown:
            raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        self.path = run_dir / STATE_FILE
        self.cfg = cfg
        self.inputs = stage_inputs(cfg)
        self.force = set(force)
        self.ran: list[str] = []
        # Hashes computed in this invocation; cleared whenever a stage finishes, as its outputs
        # (e.g. a re-exported embedder) may be what a later stage's hash covers.
        self._hashes: dict[str, str] = {}
        try:
            self.records: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.records = {}

    def must_run(self, stage: str) -> bool:
        """Forced, or a stage it reads from ran in this invocation (its inputs are new)."""
        return stage in self.force or any(s in self.ran for s in self.inputs[stage])

    def fresh(self, stage: str) -> dict | None:
        """The recorded outputs when `stage` can be skipped, else None."""
        rec = self.records.get(stage)
        if self.must_run(stage) or not rec or rec.get("hash") != stage_hash(self.cfg, stage, self._hashes):
            return None
        if not all(Path(p).exists() for p in rec.get("paths", [])):
            return None
        return rec["outputs"]

    def done(self, stage: str, outputs: dict, paths: list[Path]) -> None:
        self.ran.append(stage)
        self.records[stage] = {"hash": stage_hash(self.cfg, stage, self._hashes), "outputs": outputs,
                               "paths": [str(p) for p in paths]}
        self._hashes.clear()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.records, indent=2, ensure_ascii=False))
