"""MLflow tracking of `ray-ft run` (`tracking.mlflow`), through MLflow's own client.

One MLflow run per run folder and config digest, recorded in run_dir/tracking.json: a rerun of
the same config (stages skipped, or a stopped run resumed) continues that run; a changed config
starts a new one, which still gets the training history of a train stage the rerun skipped, so
every MLflow run holds the whole picture. The driver logs everything (the config as params, the
step history when a training stage ends, the eval table, report files): on a cluster only the
driver needs to reach the tracking server.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

from ray_ft.config import JobConfig
from ray_ft.errors import RayFTError
from ray_ft.io import write_text_atomic

STATE_FILE = "tracking.json"
PARAM_VALUE_LIMIT = 6000  # MLflow 3 rejects longer param values
log = logging.getLogger(__name__)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"}; lists and scalars become their JSON text."""
    out: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
            out[name] = text if len(text) <= PARAM_VALUE_LIMIT else text[:PARAM_VALUE_LIMIT - 1] + "…"
    return out


def numeric(row: dict) -> dict[str, float]:
    """The row's numbers (bools and None left out)."""
    return {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def history_metrics(history: list[dict], prefix: str) -> list[tuple[str, float, int]]:
    """(key, value, step) per number of each step row: `prefix/loss`, validation as `val/...`."""
    out = []
    for row in history:
        step = int(row["step"])
        for k, v in numeric(row).items():
            if k == "step":
                continue
            key = f"{prefix}/val/{k[4:]}" if k.startswith("val_") else f"{prefix}/{k}"
            out.append((key, v, step))
    return out


def eval_metrics(table: list[dict]) -> dict[str, float]:
    """`eval/MODE/MODEL/METRIC` for each mean, latency and throughput, `.../gain_METRIC` for the
    paired gain over the base, `.../METRIC_ci95_low|high` for the intervals."""
    out: dict[str, float] = {}
    for t in table:
        base = f"eval/{t['mode']}/{t['model']}"
        for k, v in numeric(t).items():
            out[f"{base}/{k}"] = v
        for k, ci in t.items():
            if k.endswith("_ci95") and ci:
                out[f"{base}/{k}_low"], out[f"{base}/{k}_high"] = float(ci[0]), float(ci[1])
        for col, (diff, lo, hi) in (t.get("gain_vs_base") or {}).items():
            out[f"{base}/gain_{col}"] = diff
            out[f"{base}/gain_{col}_ci95_low"], out[f"{base}/gain_{col}_ci95_high"] = lo, hi
    return out


def default_uri(cfg: JobConfig) -> str:
    return f"sqlite:///{(Path(cfg.output_dir) / 'mlflow.db').resolve()}"


class MLflowRun:
    """The MLflow run of one job config; `open` creates it or continues the recorded one."""

    def __init__(self, client, run_id: str, state_path: Path, state: dict, key: str):
        self.client, self.run_id = client, run_id
        self._state_path, self._state, self._key = state_path, state, key

    @classmethod
    def open(cls, cfg: JobConfig) -> "MLflowRun | None":
        if not cfg.tracking.mlflow.enabled:
            return None
        for noisy in ("mlflow", "alembic"):  # schema creation and migration lines at INFO
            logging.getLogger(noisy).setLevel(logging.WARNING)
        from mlflow import MlflowClient

        m = cfg.tracking.mlflow
        uri = m.uri or default_uri(cfg)
        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        state_path = cfg.run_dir / STATE_FILE
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        key = hashlib.sha256(f"{uri}\n{m.experiment}\n{json.dumps(cfg.model_dump(mode='json'), sort_keys=True)}"
                             .encode()).hexdigest()[:16]
        try:
            return cls._open(cfg, MlflowClient(tracking_uri=uri), state_path, state, key)
        except Exception as err:  # noqa: BLE001 - any store/server failure is the user's URI to fix
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise RayFTError(f"tracking.mlflow.uri {uri}: cannot open the MLflow run: {first}") from None

    @classmethod
    def _open(cls, cfg: JobConfig, client, state_path: Path, state: dict, key: str) -> "MLflowRun":
        m = cfg.tracking.mlflow
        rec = state.get(key)
        if rec is not None:
            client.update_run(rec["run_id"], status="RUNNING")
            run = cls(client, rec["run_id"], state_path, state, key)
        else:
            exp = client.get_experiment_by_name(m.experiment)
            artifacts = None if m.uri else (Path(cfg.output_dir) / "mlartifacts").resolve().as_uri()
            exp_id = exp.experiment_id if exp else client.create_experiment(m.experiment, artifact_location=artifacts)
            created = client.create_run(exp_id, run_name=cfg.name, tags={
                "ray_ft.run_dir": str(cfg.run_dir.resolve()), "ray_ft.task": cfg.task, "ray_ft.model": cfg.model.name})
            state[key] = {"run_id": created.info.run_id, "uri": client.tracking_uri, "logged": []}
            run = cls(client, created.info.run_id, state_path, state, key)
            run._save()
            run.log_params(flatten(cfg.model_dump(mode="json")))
        return run

    def _save(self) -> None:
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self._state_path, json.dumps(self._state, indent=2))

    def logged(self, what: str) -> bool:
        return what in self._state[self._key]["logged"]

    def _mark(self, what: str) -> None:
        if not self.logged(what):
            self._state[self._key]["logged"].append(what)
            self._save()

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's batch limit for params
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics: list[tuple[str, float, int]]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v, step in metrics]
        for i in range(0, len(items), 1000):  # MLflow's batch limit for metrics
            self.client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_history(self, stage: str, history: list[dict], again: bool) -> None:
        """A training stage's step rows, once per MLflow run unless the stage ran `again`."""
        if history and (again or not self.logged(stage)):
            self.log_metrics(history_metrics(history, stage))
            self._mark(stage)

    def log_eval(self, table: list[dict], files: list[Path], again: bool) -> None:
        if again or not self.logged("eval"):
            self.log_metrics([(k, v, 0) for k, v in eval_metrics(table).items()])
            for f in files:
                if f.is_file():
                    self.client.log_artifact(self.run_id, str(f), "eval")
            self._mark("eval")

    def set_tags(self, tags: dict[str, str]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, v)

    def log_artifact(self, path: Path, folder: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), folder)

    def end(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
