"""Runs in its own process (the test suite's shared cluster stays untouched): start a two-node
local Ray cluster (head + one worker node, separate raylets), submit a ray-ft training job with
`ray job submit`'s Python API, wait, print a JSON verdict, and tear the cluster down.

    python tests/cluster/multinode_job.py JOB.yaml DASHBOARD_PORT
"""

import os

# Ray 2.60 turns token auth on for a new cluster once ~/.ray/auth_token exists (any earlier local
# ray.init() writes it), and this script's client would then be refused: decide it here instead.
os.environ["RAY_AUTH_MODE"] = "disabled"

import json
import sys
from pathlib import Path

from ray.cluster_utils import Cluster
from job_client import submit_when_ready, wait_until_finished
from ray.job_submission import JobSubmissionClient


def main(job: str, port: int) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "include_dashboard": True, "dashboard_port": port, "dashboard_host": "127.0.0.1"})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        client = JobSubmissionClient(f"http://127.0.0.1:{port}")
        ray_ft = Path(sys.executable).with_name("ray-ft")
        sub = submit_when_ready(client, f"{ray_ft} train {job}")
        status = wait_until_finished(client, sub, 600)
        logs = client.get_job_logs(sub)
        # Ray Train's node_rank groups workers by IP, and both nodes share 127.0.0.1's IP here:
        # ask the State API on which node (raylet) each training worker actor lived.
        from ray.util.state import list_actors, list_nodes

        workers = list_actors(address=f"http://127.0.0.1:{port}", detail=True, limit=1000,
                              filters=[("class_name", "=", "RayTrainWorker")])
        nodes = list_nodes(address=f"http://127.0.0.1:{port}")
        print(json.dumps({"status": str(status), "worker_nodes": sorted({w.node_id for w in workers}),
                          "n_workers": len(workers), "cluster_nodes": sorted(n.node_id for n in nodes),
                          "log_tail": logs[-3000:]}))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
