"""What an LLM recipe's training stage hands on: the exported weights and the step history."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TrainResult:
    adapter_dir: Path  # lora: the adapter; freeze/full: the whole model folder
    metrics_file: Path
    history: list[dict]
    exported_step: int | None = None
    merged_dir: Path | None = None

    # Means over (up to) 8 steps: single batch-1 steps are too noisy to compare.
    @property
    def first_loss(self) -> float:
        return _mean_loss(self.history[:8])

    @property
    def final_loss(self) -> float:
        return _mean_loss(self.history[-8:])


def _mean_loss(rows: list[dict]) -> float:
    return sum(r["loss"] for r in rows) / len(rows)
