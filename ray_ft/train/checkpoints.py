"""What every ray_ft trainer does around `TorchTrainer.fit()`: ordered ingest, a final checkpoint
that carries the step history, and exporting that checkpoint into the run folder atomically.

Ray Train V2's `Result` keeps only the metrics reported with a checkpoint, so the whole per-step
history travels inside the final checkpoint as `ray_ft_history.jsonl`.

Every rank that writes checkpoint files also writes `ray_ft_files.rank<R>.json`: each file's size
and sha256. A restart checks them (`checkpoint_problems`) before it loads anything: a truncated
or damaged file (a full disk, a copy cut short) makes the loop fall back to the checkpoint before
it, with a warning, instead of loading garbage or dying on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from ray_ft.errors import RayFTError
from ray_ft.io import file_sha256, read_jsonl

HISTORY_FILE = "ray_ft_history.jsonl"
FILES_PREFIX = "ray_ft_files.rank"
log = logging.getLogger(__name__)


def write_file_hashes(folder: Path, rank: int) -> None:
    """`folder/ray_ft_files.rank<rank>.json`: size and sha256 of every file in `folder`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(FILES_PREFIX))
    table = {str(p.relative_to(folder)): [p.stat().st_size, file_sha256(p)] for p in files}
    (folder / f"{FILES_PREFIX}{rank}.json").write_text(json.dumps(table, indent=0))


def checkpoint_problems(folder: Path) -> list[str]:
    """What does not match the checkpoint's file hashes (missing, other size, other sha256); []
    for a whole checkpoint, or one written before ray_ft recorded hashes."""
    problems = []
    for listing in sorted(folder.glob(f"{FILES_PREFIX}*.json")):
        try:
            table = json.loads(listing.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"{listing.name}: unreadable ({err})")
            continue
        for rel, (size, sha) in table.items():
            path = folder / rel
            if not path.is_file():
                problems.append(f"{rel}: missing")
            elif path.stat().st_size != size:
                problems.append(f"{rel}: {path.stat().st_size} bytes, {size} written")
            elif file_sha256(path) != sha:
                problems.append(f"{rel}: sha256 differs from the one written")
    return problems


def ordered_ingest():
    """Ray Train's default ingest options, but blocks reach the workers in the dataset's order.

    Without `preserve_order` read tasks race and the example order (hence the loss curve) changes
    from run to run; the data stages already write their rows in a seeded order.
    """
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return DataConfig(execution_options=options)


def resumable_run_name(prefix: str, identity: dict, storage_path: str, fresh: bool = False) -> str:
    """A Ray Train run name fixed by what the run computes (`identity`: config, data, model).

    A run stopped before it finished (Ctrl-C, a dead driver, `max_failures` used up) and started
    again with the same identity finds its run folder under `storage_path`; Ray Train reloads the
    run's checkpoint snapshot and the training loop continues from the latest checkpoint. A
    finished run started again ends at once with the same export. `fresh` deletes that run's
    folder first, so training starts from step 0.
    """
    import pyarrow.fs as pafs

    key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:12]
    name = f"{prefix}_{key}"
    if fresh:
        fs, root = pafs.FileSystem.from_uri(storage_path) if "://" in storage_path else \
            (pafs.LocalFileSystem(), storage_path)
        run = f"{root.rstrip('/')}/{name}"
        if fs.get_file_info(run).type != pafs.FileType.NotFound:
            fs.delete_dir(run)
    return name


def prune_superseded_runs(storage_path: Path, prefix: str, keep: str) -> list[str]:
    """Delete the Ray Train run folders `{prefix}_<key>` under `storage_path` other than `keep`.

    Called after a run finished and was exported, on the run folder's own storage
    (`<run>/<stage>/ray`): the others are runs of earlier configs of the same stage, whose
    checkpoints (a whole model and optimizer state each, for full fine-tunes) could only resume a
    run that the finished one replaced. An explicit `train.storage_path` may be shared by other
    run folders, so it is never pruned. Returns the deleted names.
    """
    pattern = re.compile(rf"{re.escape(prefix)}_[0-9a-f]{{12}}")
    gone = []
    for run in sorted(storage_path.iterdir()) if storage_path.is_dir() else []:
        if run.is_dir() and run.name != keep and pattern.fullmatch(run.name):
            shutil.rmtree(run)
            gone.append(run.name)
    if gone:
        log.info("deleted the checkpoints of %d superseded run(s): %s", len(gone), ", ".join(gone))
    return gone


def report_checkpoint(history: list[dict], rank: int, save: Callable[[Path], None],
                      all_ranks_save: bool = False) -> None:
    """Report the latest metrics with a checkpoint written by `save(folder)` plus the history so far.

    By default only rank 0 saves and the other ranks report their metrics alone (every rank must
    report the same number of times). With `all_ranks_save` every rank calls `save` (sharded
    state, collective gathers) and reports what it wrote; Ray Train merges the ranks' files into
    one checkpoint folder, so their file names must not collide.
    """
    import ray.train

    if rank != 0 and not all_ranks_save:
        ray.train.report(history[-1])
        return
    with tempfile.TemporaryDirectory() as tmp:
        save(Path(tmp))
        if rank == 0:
            Path(tmp, HISTORY_FILE).write_text("".join(json.dumps(r) + "\n" for r in history))
        wrote = any(Path(tmp).iterdir())
        if wrote:
            write_file_hashes(Path(tmp), rank)
        ray.train.report(history[-1], checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)


def fit_and_export(trainer, out_dir: Path, name: str, best_by: str | None = None,
                   drop: tuple[str, ...] = (), best_mode: str = "max",
                   subdir: str | None = None) -> tuple[Path, list[dict], dict]:
    """Run `trainer`; copy the chosen checkpoint (or its `subdir`) to `out_dir/name` (temp folder +
    rename, without the files in `drop`) and the step history (from the latest checkpoint) to
    `out_dir/metrics.jsonl`. The chosen one is the latest, or with `best_by` the checkpoint whose
    reported metric of that name is best (`best_mode` "max" or "min"). Returns (folder, history,
    the chosen metrics)."""
    result = trainer.fit()
    if result.error:
        raise result.error
    chosen, chosen_metrics = result.checkpoint, result.metrics
    if best_by:
        scored = [(c, m) for c, m in (result.best_checkpoints or []) if m.get(best_by) is not None]
        if scored:
            pick = max if best_mode == "max" else min
            chosen, chosen_metrics = pick(scored, key=lambda cm: cm[1][best_by])
    with result.checkpoint.as_directory() as latest:
        history = read_jsonl(Path(latest, HISTORY_FILE))
    final = out_dir / name
    with chosen.as_directory() as src:
        problems = checkpoint_problems(Path(src))
        if problems:
            raise RayFTError(f"{chosen.path}: the checkpoint to export is damaged: {'; '.join(problems[:3])}")
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{name}."))
        shutil.copytree(Path(src, subdir) if subdir else src, tmp, dirs_exist_ok=True)
    for extra in (HISTORY_FILE, *drop, *(p.name for p in tmp.glob(f"{FILES_PREFIX}*.json"))):
        (tmp / extra).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    (out_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    return final, history, dict(chosen_metrics or {})
