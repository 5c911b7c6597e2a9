"""What every ray_ft trainer does around `TorchTrainer.fit()`: ordered ingest, a final checkpoint
that carries the step history, and exporting that checkpoint into the run folder atomically.

Ray Train V2's `Result` keeps only the metrics reported with a checkpoint, so the whole per-step
history travels inside the final checkpoint as `ray_ft_history.jsonl`.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

HISTORY_FILE = "ray_ft_history.jsonl"


def ordered_ingest():
    """Ray Train's default ingest options, but blocks reach the workers in the dataset's order.

    Without `preserve_order` read tasks race and the example order (hence the loss curve) changes
    from run to run; the data stages already write their rows in a seeded order.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def report_checkpoint(history: list[dict], rank: int, save: Callable[[Path], None]) -> None:
    """Rank 0 reports a checkpoint written by `save(folder)` plus the history so far; the other
    ranks report their metrics only (every rank must report the same number of times)."""
    import ray.train

    if rank != 0:
        ray.train.report(history[-1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        Path(tmp, HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(tmp))


def fit_and_export(trainer, out_dir: Path, name: str, best_by: str | None = None,
                   drop: tuple[str, ...] = ()) -> tuple[Path, list[dict], dict]:
    """Run `trainer`; copy the chosen checkpoint to `out_dir/name` (temp folder + rename, without
    the files in `drop`) and the step history (from the latest checkpoint) to
    `out_dir/metrics.jsonl`. The chosen one is the latest, or with `best_by` the checkpoint whose
    reported metric of that name is highest. Returns (folder, history, the chosen metrics)."""
    result = trainer.fit()
    if result.error:
        raise result.error
    chosen, chosen_metrics = result.checkpoint, result.metrics
    if best_by:
        scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(best_by) is not None]
        if scored:
            chosen, chosen_metrics = max(scored, key=lambda cm: cm[1][best_by])
    with result.checkpoint.as_directory() as latest:
        history = [json.loads(line) for line in Path(latest, HISTORY_FILE).read_text().splitlines()]
    final = out_dir / name
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
    chosen.to_directory(str(tmp))
    for extra in (HISTORY_FILE, *drop):
        (tmp / extra).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return final, history, dict(chosen_metrics or {})
