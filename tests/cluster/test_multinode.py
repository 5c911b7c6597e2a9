"""Multi-node placement shown on one machine: a local cluster of two nodes (separate raylets),
a ray-ft training job submitted to it with `ray job submit`, its two Ray Train workers on
different nodes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_squad

FACTS = [(f"Station {i} is in city {c}.", [(f"q{i}", f"Where is station {i}?", c)])
         for i, c in enumerate(["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Doha", "Baku", "Riga", "Sofia", "Quito"])]


def write_training_job(tmp_path: Path, name: str, model_dir: Path) -> Path:
    """A ray-ft training job that joins the cluster it is submitted to: 2 workers x 2 CPUs,
    2 steps of the tiny model on 10 facts."""
    src = make_squad(tmp_path / "qa.json", FACTS)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": name, "output_dir": str(tmp_path / "runs"), "ray": {"address": "auto"},
        "model": {"name": str(model_dir)},
        "data": {"source": str(src), "language": "en", "val_size": 0.2, "max_samples": 8, "cutoff_len": 512,
                 "num_shards": 2},
        "train": {"num_workers": 2, "cpus_per_worker": 2, "max_steps": 2, "tensorboard": False},
    }))
    return job


@pytest.mark.slow
def test_ray_job_submit_places_training_workers_on_two_nodes(tmp_path, tiny_model_dir):
    # 2 workers x 2 CPUs: the head (3 CPUs) holds one, the second has to go to the worker node.
    job = write_training_job(tmp_path, "multinode", tiny_model_dir)
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_job.py")), str(job), "8277"],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    assert verdict["status"] == "SUCCEEDED", verdict["log_tail"]
    assert verdict["n_workers"] == 2 and len(verdict["cluster_nodes"]) == 2
    assert verdict["worker_nodes"] == verdict["cluster_nodes"], verdict  # one worker on each node
    adapter = tmp_path / "runs" / "multinode" / "train" / "adapter" / "adapter_model.safetensors"
    assert adapter.is_file()
    history = [json.loads(x) for x in (adapter.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
