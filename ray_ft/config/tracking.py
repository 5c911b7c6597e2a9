"""`tracking`: experiment trackers that `ray-ft run` logs to, next to the run folder's own files."""

from __future__ import annotations

from pydantic import Field

from ray_ft.config.base import _Strict


class MLflowConfig(_Strict):
    """One MLflow run per run folder and config: the whole config as params, every training step's
    metrics (logged when the stage ends; TensorBoard has them live), the eval table, the report
    files and the resolved config as artifacts, the adapter folder as a tag. A rerun of the same
    config continues its run; a changed config (an override, an edit) starts a new one."""

    enabled: bool = Field(False, description="Log `ray-ft run` to MLflow (off by default: the run folder "
                          "holds every number already; a tracker is a store shared across runs you opt into).")
    uri: str | None = Field(
        None, description="Tracking URI: a server (`http://mlflow:5000`, what a cluster wants) or a database "
        "(`sqlite:///PATH`). None: `sqlite:///OUTPUT_DIR/mlflow.db`, artifacts in OUTPUT_DIR/mlartifacts "
        "(`mlflow ui --backend-store-uri sqlite:///runs/mlflow.db` browses it).",
    )
    experiment: str = Field("ray_ft", description="Experiment the runs go to (created when missing).")


class TrackingConfig(_Strict):
    mlflow: MLflowConfig = Field(default_factory=MLflowConfig)
