"""Autoscaling shown on one machine: Ray's fake multi-node provider behind a real autoscaler.
A ray-ft training job submitted with `ray job submit` asks for 2 workers x 2 CPUs; the head has
1 CPU, so the autoscaler must add worker nodes for it, and remove them once they sit idle."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster.test_multinode import write_training_job


@pytest.mark.slow
def test_training_job_scales_the_cluster_up_and_back_down(tmp_path, tiny_model_dir):
    job = write_training_job(tmp_path, "autoscale", tiny_model_dir)
    work = tmp_path / "cluster"
    work.mkdir()
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("autoscaling_job.py")), str(job), str(work)],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    print({k: v for k, v in verdict.items() if k != "log_tail"})
    assert verdict["status"] == "SUCCEEDED", verdict["log_tail"]
    assert verdict["workers_before"] == []  # min_workers 0: nothing runs before the job asks
    # Two 2-CPU workers need two 2-CPU nodes: the autoscaler added both, and the workers ran there.
    assert verdict["most_workers_alive"] == 2, verdict
    assert verdict["train_worker_nodes"] == verdict["worker_nodes_seen"], verdict
    assert verdict["scaled_down"] and verdict["workers_after"] == [], verdict
    adapter = tmp_path / "runs" / "autoscale" / "train" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file()
