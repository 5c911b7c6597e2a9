"""Runs in its own process: start a local autoscaling Ray cluster whose worker nodes are fake
(each one a real raylet started by Ray's fake multi-node provider on this machine), submit a ray-ft
training job with `ray job submit`'s Python API, watch the nodes while the job runs and after it,
print a JSON verdict, and tear down exactly this cluster's processes.

    python tests/cluster/autoscaling_job.py JOB.yaml WORK_DIR

Why not `ray.cluster_utils.AutoscalingCluster`: it starts and stops with `ray stop --force`, which
kills every Ray process on the machine (the test session's own cluster included), and it reads a
defaults file (fake_multi_node/example.yaml) that Ray's wheel does not ship. The same provider class
is loaded here as an `external` provider, whose defaults are built in.
"""

import os

# Ray 2.60 turns token auth on for a new cluster once ~/.ray/auth_token exists (any earlier local
# ray.init() writes it), and this script's client would then be refused: decide it here instead.
os.environ["RAY_AUTH_MODE"] = "disabled"

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import ray._private.services as services
from job_client import submit_when_ready, wait_until_finished
from ray.job_submission import JobSubmissionClient

WORKER_TYPE = "cpu_worker"
WORKER_CPUS = 2
IDLE_TIMEOUT_S = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaler_config(gcs_address: str) -> dict:
    return {
        "cluster_name": "ray-ft-fake-autoscaling",
        "max_workers": 2,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_TIMEOUT_S / 60,
        "provider": {
            "type": "external",
            "module": "ray.autoscaler._private.fake_multi_node.node_provider.FakeMultiNodeProvider",
            "gcs_address": gcs_address,
            # Nodes are processes here: no SSH updaters, node ids stand in for IPs.
            "use_node_id_as_ip": True, "disable_node_updaters": True, "disable_launch_config_check": True,
        },
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {}, "node_config": {}, "max_workers": 0},
            WORKER_TYPE: {"resources": {"CPU": WORKER_CPUS}, "node_config": {}, "min_workers": 0, "max_workers": 2},
        },
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


def start_head(work: Path) -> tuple[subprocess.Popen, str, str]:
    """The head process (`ray start --block`), its dashboard URL and its temp dir."""
    gcs_port, dash_port, client_port = free_port(), free_port(), free_port()
    gcs_address = f"{services.get_node_ip_address()}:{gcs_port}"
    config = work / "autoscaler.json"
    config.write_text(json.dumps(autoscaler_config(gcs_address)))
    ray = Path(sys.executable).with_name("ray")
    # Its own temp dir keeps this cluster's session apart; short, as socket paths max out at 107 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rft-as-", dir="/tmp")
    env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env.pop("RAY_ADDRESS", None)
    # The head has 1 CPU: Ray Train's controller fits there, its 2-CPU workers do not.
    head = subprocess.Popen(
        [str(ray), "start", "--head", "--block", f"--port={gcs_port}", "--num-cpus=1",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}",
         f"--ray-client-server-port={client_port}", f"--autoscaling-config={config}",
         f"--temp-dir={temp_dir}"],
        env=env, stdout=open(work / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    return head, f"http://127.0.0.1:{dash_port}", temp_dir


def stop_head(head: subprocess.Popen) -> None:
    """Kill the head and every process under it (fake nodes are started by its autoscaler)."""
    try:
        procs = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=30)


def alive_workers(dashboard: str) -> list[str]:
    from ray.util.state import list_nodes

    return sorted(n.node_id for n in list_nodes(address=dashboard, limit=100)
                  if n.state == "ALIVE" and not n.is_head_node)


def wait_for(predicate, timeout_s: float, every_s: float = 1.0):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            value = predicate()
        except SystemExit:
            raise
        except Exception:  # the dashboard is still starting
            value = None
        if value:
            return value
        time.sleep(every_s)
    return None


def main(job: str, work: Path) -> None:
    head, dashboard, temp_dir = start_head(work)
    try:
        def client_once_up():
            if head.poll() is not None:
                raise SystemExit(f"ray start exited {head.returncode}: {(work / 'head.log').read_text()[-3000:]}")
            return JobSubmissionClient(dashboard)

        client = wait_for(client_once_up, 120)
        assert client is not None, (work / "head.log").read_text()[-3000:]
        before = alive_workers(dashboard)
        sub = submit_when_ready(client, f"{Path(sys.executable).with_name('ray-ft')} train {job}")
        seen: set[str] = set()
        most = 0

        def sample_nodes():
            nonlocal most
            try:
                now = alive_workers(dashboard)
            except Exception:  # a state-API hiccup under load: skip this sample
                return
            seen.update(now)
            most = max(most, len(now))

        status = wait_until_finished(client, sub, 900, every=sample_nodes)
        from ray.util.state import list_actors

        workers = list_actors(address=dashboard, detail=True, limit=1000,
                              filters=[("class_name", "=", "RayTrainWorker")])
        job_done = time.time()
        # Scale-down: every worker node idle past idle_timeout_minutes goes away again.
        empty = wait_for(lambda: alive_workers(dashboard) == [] or None, 240)
        print(json.dumps({
            "status": str(status), "workers_before": before, "most_workers_alive": most,
            "worker_nodes_seen": sorted(seen), "train_worker_nodes": sorted({w.node_id for w in workers}),
            "scaled_down": bool(empty), "scale_down_s": round(time.time() - job_done, 1),
            "workers_after": alive_workers(dashboard), "log_tail": client.get_job_logs(sub)[-3000:],
        }))
    finally:
        stop_head(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
