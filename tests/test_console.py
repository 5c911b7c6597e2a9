"""The run view and where log records go (`ray_ft.console`)."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from ray_ft import console
from ray_ft.console import RunView, report_progress, report_stage


@pytest.fixture(autouse=True)
def restore_logging():
    yield
    console.setup_logging(None, True)  # what `ray-ft` starts with; later tests see the old routing
    logging.captureWarnings(False)


def _lines(out: io.StringIO) -> list[str]:
    return [line.split("] ", 1)[1] for line in out.getvalue().splitlines()]


def test_plain_lines_bound_the_progress_rate_and_give_an_eta(tmp_path):
    out = io.StringIO()
    with RunView(["prepare", "train", "serve", "eval"], tmp_path, interactive=False, interval_s=3600, out=out):
        report_stage("prepare", "skipped")
        report_stage("train", "running")
        for step in range(1, 201):
            report_progress("train", step, 200, loss=2.0 - step / 200)
        report_stage("train", "done", 75.0)
        report_stage("eval", "failed", 3.2)
    lines = _lines(out)
    assert lines[0] == "prepare: skipped (config and inputs unchanged)"
    assert lines[1] == "train: running"
    # 200 updates, one line at the first and one at the end: the rate is bounded by interval_s.
    assert lines[2].startswith("train: 1/200 (0%) loss=1.995") and lines[3].startswith("train: 200/200 (100%) loss=1")
    assert "eta" not in lines[3]
    assert lines[4:] == ["train: done in 1m15s", "eval: failed in 3s"]
    report_progress("train", 1, 2)  # no view open: nothing happens
    assert len(out.getvalue().splitlines()) == 6


def test_eta_follows_the_rate_since_the_first_report(tmp_path, monkeypatch):
    now = [100.0]
    view = RunView(["train"], tmp_path, interactive=False, interval_s=0, out=io.StringIO())
    monkeypatch.setattr(console.time, "monotonic", lambda: now[0])
    view.progress("train", 10, 100)
    now[0] = 110.0
    view.progress("train", 20, 100)  # 10 steps in 10 s, 80 to go
    assert _lines(view.out)[-1] == "train: 20/100 (20%) eta 1m20s"


def test_the_view_reads_rank_zeros_progress_file(tmp_path):
    out = io.StringIO()
    with RunView(["train"], tmp_path, interactive=False, interval_s=0, out=out):
        (tmp_path / "train").mkdir()
        report_stage("train", "running")
        time.sleep(0.05)
        with (tmp_path / "train" / console.PROGRESS_FILE).open("a") as f:
            f.write(json.dumps({"step": 3, "n_steps": 12, "tag": "train", "loss": 1.25, "tokens_per_s": 812.0}) + "\n")
        deadline = time.time() + 10
        while "3/12" not in out.getvalue() and time.time() < deadline:
            time.sleep(0.1)
    assert "train train: 3/12 (25%) loss=1.25 tokens_per_s=812" in out.getvalue()


def test_the_live_view_renders_each_stage_state(tmp_path):
    out = io.StringIO()
    with RunView(["embed", "prepare", "train"], tmp_path, interactive=True, out=out):
        report_stage("embed", "skipped")
        report_stage("prepare", "done", 12.0)
        report_stage("train", "running")
        report_progress("train", 5, 10, loss=1.5)
    text = out.getvalue()
    assert "↷ embed" in text and "✓ prepare" in text and "▶ train" in text
    assert "5/10 (50%) loss=1.5" in text and "12s" in text


QUIET_THEN_IMPORT = """
import logging, sys
from ray_ft import console
console.setup_logging(None, False)
console.quiet_libraries()
import ray.data  # as the prepare stage does, after the command set the routing up
levels = [h.level for h in logging.getLogger("ray.data").handlers if type(h).__name__ != "SessionFileHandler"]
print(levels, ray.data.DataContext.get_current().enable_progress_bars)
"""


def test_ray_data_imported_after_the_routing_is_set_up_stays_off_the_terminal():
    import subprocess
    import sys

    # A fresh interpreter: in this one, other tests imported Ray Data long ago.
    out = subprocess.run([sys.executable, "-c", QUIET_THEN_IMPORT], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"[{logging.CRITICAL + 1}] False"


def test_quiet_logging_keeps_the_terminal_for_ray_ft_warnings_and_the_file_for_everything(tmp_path, capsys):
    run_dir = tmp_path / "run"
    console.setup_logging(run_dir, False)
    assert not run_dir.exists()  # made at the first record, not before
    lib = logging.getLogger("ray.data")
    own = logging.StreamHandler()
    lib.addHandler(own)
    lib.propagate = False
    try:
        console.quiet_libraries()
        logging.getLogger("ray_ft.x").info("an info line")
        logging.getLogger("ray_ft.x").warning("a warning line")
        logging.getLogger("ray.serve").error("a serve error")
        lib.info("ray data progress")
        err = capsys.readouterr().err
        assert "a warning line" in err and "an info line" not in err and "a serve error" not in err
        assert own.level > logging.CRITICAL  # the library's own terminal handler: silenced
        text = console.driver_log(run_dir).read_text()
        assert all(s in text for s in ("an info line", "a warning line", "a serve error", "ray data progress"))
    finally:
        lib.removeHandler(own)
        lib.propagate = True
