"""Multi-node placement shown on one machine: a local cluster of two nodes (separate raylets),
a whole `ray-ft run` job (prepare -> train -> serve -> evaluate) submitted to it with
`ray job submit`, its two Ray Train workers on different nodes, the report written; submitted
again, the finished job skips every stage."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_squad

FACTS = [(f"Station {i} is in city {c}.", [(f"q{i}", f"Where is station {i}?", c)])
         for i, c in enumerate(["Paris", "Rome", "Oslo", "Lima", "Kyiv", "Doha", "Baku", "Riga", "Sofia", "Quito"])]


def write_training_job(tmp_path: Path, name: str, model: str | Path, **sections) -> Path:
    """A ray-ft job that joins the cluster it is submitted to: 2 workers x 2 CPUs, 2 steps on
    8 of 10 facts (2 held out); `sections` add or replace top-level sections (serve, eval)."""
    src = make_squad(tmp_path / "qa.json", FACTS)
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "name": name, "output_dir": str(tmp_path / "runs"), "ray": {"address": "auto"},
        "model": {"name": str(model)},
        "data": {"source": str(src), "language": "en", "eval_size": 0.2, "max_samples": 8, "cutoff_len": 512,
                 "num_shards": 2},
        "train": {"num_workers": 2, "cpus_per_worker": 2, "max_steps": 2, "tensorboard": False},
        **sections,
    }))
    return job


@pytest.mark.slow
def test_ray_job_submit_of_a_run_trains_on_two_nodes_and_writes_the_report(tmp_path, smollm_dir):
    # 2 workers x 2 CPUs: the head (3 CPUs) holds one, the second has to go to the worker node.
    # Clients reach the head only: Serve's HTTP proxy runs there alone.
    job = write_training_job(tmp_path, "multinode", "SmolLM2-135M-Instruct",
                             serve={"http_port": 8768, "proxy_location": "HeadOnly", "max_tokens": 8},
                             eval={"max_samples": 2, "concurrency": 2, "plots": False})
    run = f"{Path(sys.executable).with_name('ray-ft')} run {job}"
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("multinode_job.py")), "8277", run, run],
                         capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stderr[-3000:]
    verdict = json.loads(out.stdout.strip().splitlines()[-1])
    first, again = verdict["jobs"]
    print({"seconds": [first["seconds"], again["seconds"]]})
    assert first["status"] == "SUCCEEDED", first["log_tail"]
    assert verdict["n_workers"] == 2 and len(verdict["cluster_nodes"]) == 2
    assert verdict["worker_nodes"] == verdict["cluster_nodes"], verdict  # one worker on each node
    assert verdict["proxy_nodes"] == [verdict["head_node"]], verdict  # serve.proxy_location: HeadOnly

    runs = tmp_path / "runs" / "multinode"
    history = [json.loads(x) for x in (runs / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2]
    table = json.loads((runs / "eval" / "summary.json").read_text())
    assert {(t["model"], t["mode"]) for t in table} == {(m, d) for m in ("base", "finetuned") for d in ("gold", "retrieved")}
    assert all(t["n"] == 2 for t in table)
    preds = [json.loads(x) for x in (runs / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(preds) == 8 and all(p["prediction"].strip() for p in preds)
    assert {p["served_model"] for p in preds} == {"SmolLM2-135M-Instruct", "multinode"}
    assert (runs / "eval" / "summary.md").read_text().startswith("### gold context (n = 2)")
    assert first["printed_report"]  # the report, printed by the job

    # The same submission again: every stage is skipped (the outputs are in output_dir).
    assert again["status"] == "SUCCEEDED", again["log_tail"]
    assert "skipped (config and inputs unchanged): prepare, train, eval" in again["log_tail"]
    summary = json.loads((runs / "run_summary.json").read_text())
    assert summary["skipped"] == ["prepare", "train", "eval"] and summary["timings"] == {}
    assert again["seconds"] < first["seconds"] / 4  # submission, start-up and hashing only
    assert summary["eval"] == table
