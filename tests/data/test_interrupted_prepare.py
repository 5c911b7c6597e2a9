"""`ray-ft prepare` killed with SIGKILL half-way (its temp folder partly written, nothing renamed
into place) and run again: the rerun does not reuse the partial output, removes what the killed
writer left, and writes exactly what an uninterrupted run writes (every file's sha256)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import CMRC
from tests.test_cli import ray_ft


def _job(tmp_path, name, model_dir):
    job = tmp_path / f"{name}.yaml"
    job.write_text(f"name: {name}\noutput_dir: {tmp_path / 'runs'}\nmodel:\n  name: {model_dir}\n"
                   f"data:\n  source: {CMRC}\n  language: zh\n  max_samples: 600\n  num_shards: 2\n")
    return job


def _files(data_dir) -> dict:
    return json.loads((data_dir / "manifest.json").read_text())["files"]


@pytest.mark.slow
def test_prepare_killed_half_way_is_redone_cleanly(tmp_path, tiny_model_dir):
    code, _, err = ray_ft("prepare", str(_job(tmp_path, "whole", tiny_model_dir)))
    assert code == 0, err
    expected = _files(tmp_path / "runs" / "whole" / "data")

    job, run_dir = _job(tmp_path, "killed", tiny_model_dir), tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "ray_ft.cli", "prepare", str(job)], start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    deadline = time.monotonic() + 240
    partial = []
    while time.monotonic() < deadline and not partial and proc.poll() is None:
        # half-written: the temp folder holds files, the folder itself is not in place yet
        partial = [t for t in run_dir.glob(".data.*") if any(p.is_file() for p in t.rglob("*"))]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
    proc.wait()
    assert partial, "prepare finished before it could be killed half-way"
    assert not (run_dir / "data").exists() and list(run_dir.glob(".data.*"))

    code, _, err = ray_ft("prepare", str(job))
    assert code == 0, err
    assert _files(run_dir / "data") == expected
    assert not list(run_dir.glob(".data.*"))  # the killed writer's temp folder is gone
