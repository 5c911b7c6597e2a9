"""`ray-ft serve JOB.yaml` as a user runs it: a subprocess that starts its own local Ray cluster,
serves a finished run, and on SIGINT or SIGTERM shuts down gracefully (a streamed answer in
flight still completes) and exits 0."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
import yaml

from tests.serve.conftest import free_port

DOCS = [{"passage_id": "everest", "text": "Mount Everest is the highest mountain on Earth, 8,849 metres tall."},
        {"passage_id": "nile", "text": "The Nile is a major river in Africa that flows into the Mediterranean Sea."}]


def _finished_run(tmp_path, port: int):
    run = tmp_path / "runs" / "svc"
    (run / "data").mkdir(parents=True)
    (run / "data" / "knowledge_base.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    job = {"name": "svc", "output_dir": str(tmp_path / "runs"), "data": {"language": "en"},
           "eval": {"models": ["base"]}, "ray": {"num_cpus": 4, "include_dashboard": False},
           "serve": {"http_port": port, "max_tokens": 16,
                     "deployments": {"generator": {"graceful_shutdown_timeout_s": 60}}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def _stream(url: str, out: dict, first_chunk: threading.Event):
    body = {"model": "SmolLM2-135M-Instruct", "stream": True, "max_tokens": 64,
            "messages": [{"role": "user", "content": "Describe the Nile in four sentences."}]}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=120) as resp:
        for line in resp.iter_lines():
            out.setdefault("lines", []).append(line)
            if '"content":' in line and '"content":""' not in line:
                first_chunk.set()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_ray_ft_serve_serves_a_finished_run_and_stops_gracefully_on_a_signal(tmp_path, sig):
    port = free_port()
    job = _finished_run(tmp_path, port)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(job.parents[0]), *sys.path]))}
    proc = subprocess.Popen([sys.executable, "-m", "ray_ft.cli", "serve", str(job)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 300
        while not any(ln.startswith("serving http://") for ln in lines):
            assert proc.poll() is None, "".join(lines[-30:])
            assert time.monotonic() < deadline, "".join(lines[-30:])
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        assert next(ln for ln in lines if ln.startswith("serving")).startswith(
            f"serving {url} (models: SmolLM2-135M-Instruct; 2 documents)")
        rag = httpx.post(f"{url}/v1/rag", json={"query": "How tall is Mount Everest?"}, timeout=120).json()
        assert rag["contexts"][0]["node_id"] == "everest"

        streamed, first_chunk = {}, threading.Event()
        client = threading.Thread(target=_stream, args=(url, streamed, first_chunk))
        client.start()
        assert first_chunk.wait(120)
        proc.send_signal(sig)  # Ctrl-C (or Kubernetes' SIGTERM) while the answer is being streamed
        client.join(120)
        assert [ln for ln in streamed["lines"] if ln][-1] == "data: [DONE]"  # the answer in flight was finished
        assert proc.wait(120) == 0
        reader.join(10)
        out = "".join(lines)
        assert "stopping: finishing requests in flight" in out and out.rstrip().endswith("stopped")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{url}/healthz", timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
