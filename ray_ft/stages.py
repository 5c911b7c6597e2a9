"""Which stages of `ray-ft run` can be skipped: a record per stage of the config hash it ran with.

`run_dir/stages.json` holds, per finished stage, the hash of everything that stage depends on (its
config sections and the hash of the stage before it) and its outputs. A stage is skipped when its
hash is unchanged, its outputs still exist, it is not forced, and no stage before it ran again in
this invocation. A stage's record is written only after it completed, so an interrupted run
resumes at the stage that did not finish.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.io import write_text_atomic

STAGES = ("prepare", "train", "eval")
STATE_FILE = "stages.json"


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def stage_hashes(cfg: JobConfig) -> dict[str, str]:
    """Each stage's hash chains the one before it, so a change upstream changes everything after."""
    from ray_ft.data.prepare import data_config_hash

    prepare = data_config_hash(cfg)  # data + model config and the source file's bytes
    train = _digest({"prepare": prepare, "train": cfg.train.model_dump()})
    evaluate = _digest({"train": train, "serve": cfg.serve.model_dump(), "eval": cfg.eval.model_dump()})
    return {"prepare": prepare, "train": train, "eval": evaluate}


class StageLog:
    """The stages.json of one run folder."""

    def __init__(self, run_dir: Path, cfg: JobConfig, force: set[str] | frozenset[str] = frozenset()):
        unknown = set(force) - set(STAGES)
        if unknown:
            raise ValueError(f"--force: unknown stage(s) {sorted(unknown)}; stages are {list(STAGES)}")
        self.path = run_dir / STATE_FILE
        self.hashes = stage_hashes(cfg)
        self.force = set(force)
        self.ran: list[str] = []
        try:
            self.records: dict = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.records = {}

    def fresh(self, stage: str) -> dict | None:
        """The recorded outputs when `stage` can be skipped, else None."""
        rec = self.records.get(stage)
        if stage in self.force or self.ran or not rec or rec.get("hash") != self.hashes[stage]:
            return None
        if not all(Path(p).exists() for p in rec.get("paths", [])):
            return None
        return rec["outputs"]

    def done(self, stage: str, outputs: dict, paths: list[Path]) -> None:
        self.ran.append(stage)
        self.records[stage] = {"hash": self.hashes[stage], "outputs": outputs, "paths": [str(p) for p in paths]}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.path, json.dumps(self.records, indent=2, ensure_ascii=False))
