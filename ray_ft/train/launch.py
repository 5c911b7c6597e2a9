"""How every recipe starts its workers: one Ray Train run that resumes, keeps the best
checkpoints and exports the chosen one into the run folder.

A run's name is fixed by what it computes (`identity`), so a stopped run started again with the
same config, data and model continues from its latest checkpoint (`resume=False`: from step 0);
superseded runs of the same stage in the run folder's own storage are deleted once a run is
exported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ray_ft.console import PROGRESS_FILE
from ray_ft.train import faults
from ray_ft.train.checkpoints import fit_and_export, ordered_ingest, prune_superseded_runs, resumable_run_name


@dataclass(frozen=True)
class Workers:
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float


@dataclass(frozen=True)
class Launch:
    """One Ray Train run of `loop(loop_config)` on `workers`."""

    loop: Callable[[dict], None]
    loop_config: dict
    workers: Workers
    run_prefix: str  # the stage's run folders are `{run_prefix}_<identity hash>`
    identity: dict  # what the run computes: config, data, model
    datasets: dict  # name -> ray.data.Dataset, sharded over the workers
    export_name: str  # out_dir/<export_name> receives the chosen checkpoint
    keep_checkpoints: int = 2
    max_failures: int = 1
    best_by: str | None = None  # a reported metric; None: the latest checkpoint
    best_mode: str = "max"
    storage_path: str | None = None  # None: out_dir/ray, which is pruned
    subdir: str | None = None  # export only this folder of the checkpoint
    drop: tuple[str, ...] = field(default=())  # files of the checkpoint left out of the export


def launch(spec: Launch, out_dir: Path, resume: bool = True) -> tuple[Path, list[dict], dict]:
    """Fit and export; returns (exported folder, step history, the chosen checkpoint's metrics)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    out_dir.mkdir(parents=True, exist_ok=True)
    storage = spec.storage_path or str((out_dir / "ray").resolve())
    run_name = resumable_run_name(spec.run_prefix, spec.identity, storage, fresh=not resume)
    w = spec.workers
    progress = out_dir / PROGRESS_FILE  # rank 0's step rows, for the driver's run view
    progress.write_text("")
    trainer = TorchTrainer(
        spec.loop,
        train_loop_config={**spec.loop_config, "test_faults": faults.from_environment(),
                           "progress_file": str(progress.resolve())},
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu,
                                     resources_per_worker=None if w.use_gpu else {"CPU": w.cpus_per_worker}),
        run_config=RunConfig(
            name=run_name, storage_path=storage,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.keep_checkpoints, checkpoint_score_attribute=spec.best_by,
                checkpoint_score_order=spec.best_mode),
            failure_config=FailureConfig(max_failures=spec.max_failures)),
        datasets=spec.datasets,
        dataset_config=ordered_ingest(),
    )
    exported = fit_and_export(trainer, out_dir, spec.export_name, best_by=spec.best_by, drop=spec.drop,
                              best_mode=spec.best_mode, subdir=spec.subdir)
    if not spec.storage_path:  # only the run folder's own storage; a given one may be shared
        prune_superseded_runs(Path(storage), spec.run_prefix, run_name)
    return exported
