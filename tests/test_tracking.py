"""MLflow tracking on a real local store (SQLite), read back through MLflow's client. The run of a
real `ray-ft run` is checked in tests/test_e2e.py."""

import pytest

from ray_ft.config import parse_job
from ray_ft.errors import RayFTError
from ray_ft.tracking import PARAM_VALUE_LIMIT, MLflowRun, eval_metrics, flatten, history_metrics


def _cfg(tmp_path, **tracking):
    return parse_job({"name": "t", "output_dir": str(tmp_path / "runs"), "train": {"learning_rate": 1e-4},
                      "tracking": {"mlflow": {"enabled": True, **tracking}}})


def test_flatten_dots_the_keys_and_bounds_the_values():
    flat = flatten({"a": {"b": 1, "c": [1, 2], "d": {}}, "e": "x" * (PARAM_VALUE_LIMIT + 5), "f": None})
    assert flat["a.b"] == "1" and flat["a.c"] == "[1, 2]" and flat["a.d"] == "{}" and flat["f"] == "null"
    assert len(flat["e"]) == PARAM_VALUE_LIMIT and flat["e"].endswith("…")


def test_history_and_eval_metrics_names():
    rows = [{"step": 1, "loss": 2.0, "early_stop": False, "mfu": None}, {"step": 2, "loss": 1.0, "val_loss": 1.5}]
    assert history_metrics(rows, "train") == [("train/loss", 2.0, 1), ("train/loss", 1.0, 2), ("train/val/loss", 1.5, 2)]
    table = [{"model": "finetuned", "mode": "gold", "n": 4, "em": 0.5, "em_ci95": [0.25, 0.75], "cosine": None,
              "gain_vs_base": {"em": [0.25, 0.0, 0.5]}}]
    assert eval_metrics(table) == {
        "eval/gold/finetuned/n": 4.0, "eval/gold/finetuned/em": 0.5, "eval/gold/finetuned/em_ci95_low": 0.25,
        "eval/gold/finetuned/em_ci95_high": 0.75, "eval/gold/finetuned/gain_em": 0.25,
        "eval/gold/finetuned/gain_em_ci95_low": 0.0, "eval/gold/finetuned/gain_em_ci95_high": 0.5}


def test_one_run_per_config_continued_by_a_rerun(tmp_path):
    from mlflow import MlflowClient

    cfg = _cfg(tmp_path)
    run = MLflowRun.open(cfg)
    run.log_history("train", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], again=False)
    report = tmp_path / "summary.md"
    report.write_text("| metric |")
    run.log_eval([{"model": "base", "mode": "gold", "n": 2, "em": 0.5}], [report, tmp_path / "absent.html"], again=False)
    run.end()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    got = client.get_run(run.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "t"
    assert got.data.params["train.learning_rate"] == "0.0001" and got.data.params["name"] == "t"
    assert client.get_experiment(got.info.experiment_id).name == "ray_ft"
    assert [f.path for f in client.list_artifacts(run.run_id, "eval")] == ["eval/summary.md"]

    again = MLflowRun.open(cfg)  # same config: the same run, nothing logged twice
    assert again.run_id == run.run_id and client.get_run(run.run_id).info.status == "RUNNING"
    again.log_history("train", [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0}], again=False)
    again.log_history("train", [{"step": 3, "loss": 0.5}], again=True)  # the stage ran again: logged
    again.end(failed=True)
    assert [m.step for m in client.get_metric_history(run.run_id, "train/loss")] == [1, 2, 3]
    assert client.get_run(run.run_id).info.status == "FAILED"

    changed = MLflowRun.open(cfg.model_copy(update={"train": cfg.train.model_copy(update={"learning_rate": 2e-4})}))
    assert changed.run_id != run.run_id and not changed.logged("train")
    assert client.get_run(changed.run_id).data.params["train.learning_rate"] == "0.0002"


def test_tracking_off_opens_nothing(tmp_path):
    cfg = parse_job({"name": "t", "output_dir": str(tmp_path / "runs")})
    assert MLflowRun.open(cfg) is None and not (tmp_path / "runs").exists()


def test_a_tracking_uri_and_experiment_from_the_config(tmp_path):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'elsewhere' / 'm.db'}"
    run = MLflowRun.open(_cfg(tmp_path, uri=uri, experiment="cmrc"))
    run.end()
    client = MlflowClient(tracking_uri=uri)
    assert client.get_experiment(client.get_run(run.run_id).info.experiment_id).name == "cmrc"
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_an_unreachable_server_is_one_error_naming_the_uri(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    with pytest.raises(RayFTError, match=r"tracking.mlflow.uri http://127.0.0.1:9: cannot open the MLflow run"):
        MLflowRun.open(_cfg(tmp_path, uri="http://127.0.0.1:9"))
