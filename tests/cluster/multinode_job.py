"""Runs in its own process (the test suite's shared cluster stays untouched): start a two-node
local Ray cluster (head + one worker node, separate raylets), submit each given entrypoint in turn
with `ray job submit`'s Python API, wait for each, print a JSON verdict, tear the cluster down.

    python tests/cluster/multinode_job.py DASHBOARD_PORT ENTRYPOINT [ENTRYPOINT ...]
"""

import os

# Ray 2.60 turns token auth on for a new cluster once ~/.ray/auth_token exists (any earlier local
# ray.init() writes it), and this script's client would then be refused: decide it here instead.
os.environ["RAY_AUTH_MODE"] = "disabled"

import json
import sys
import time

from ray.cluster_utils import Cluster
from job_client import submit_when_ready, wait_until_finished
from ray.job_submission import JobSubmissionClient


def main(port: int, entrypoints: list[str]) -> None:
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "include_dashboard": True, "dashboard_port": port, "dashboard_host": "127.0.0.1"})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    try:
        client = JobSubmissionClient(f"http://127.0.0.1:{port}")
        jobs = []
        for entrypoint in entrypoints:
            t = time.perf_counter()
            sub = submit_when_ready(client, entrypoint)
            status = wait_until_finished(client, sub, 900)
            logs = client.get_job_logs(sub)
            # engine shutdown lines from the replicas may follow the report, so it is looked for in
            # the whole log, not only in the tail
            jobs.append({"entrypoint": entrypoint, "status": str(status), "seconds": round(time.perf_counter() - t, 1),
                         "log_tail": logs[-4000:], "printed_report": "| metric | base | finetuned |" in logs})
        # Ray Train's node_rank groups workers by IP, and both nodes share 127.0.0.1's IP here:
        # ask the State API on which node (raylet) each training worker actor lived.
        from ray.util.state import list_actors, list_nodes

        def nodes_of(actor_class: str) -> list[str]:
            return [a.node_id for a in list_actors(address=f"http://127.0.0.1:{port}", detail=True, limit=1000,
                                                   filters=[("class_name", "=", actor_class)])]

        workers = nodes_of("RayTrainWorker")
        nodes = list_nodes(address=f"http://127.0.0.1:{port}")
        print(json.dumps({"jobs": jobs, "worker_nodes": sorted(set(workers)), "n_workers": len(workers),
                          "proxy_nodes": sorted(set(nodes_of("ProxyActor"))),
                          "head_node": next(n.node_id for n in nodes if n.is_head_node),
                          "cluster_nodes": sorted(n.node_id for n in nodes)}))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2:])
