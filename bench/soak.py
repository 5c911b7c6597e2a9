"""Soak: the served RAG graph under a bounded mixed load for a fixed time (chat, streamed chat,
embeddings, rag, retrieve in turn; `--concurrency` in flight), with one embedder replica killed
half-way (Serve replaces it; the ingress and retriever re-send what it held). The graph is the
job defaults on a local Ray cluster (SmolLM2 on vLLM CPU, MiniLM on two replicas, a LanceDB
knowledge base of `--kb` Financial-QA-10k contexts). The same loop runs for 2 minutes in CI
(tests/serve/test_soak.py).

    .venv/bin/python bench/soak.py [--minutes 30] [--concurrency 4] [--kb 200] [--no-kill]

Prints the requests, failures and re-sent answers by kind, p50/p95 latency in the first vs the
last tenth of the run, and the resident memory and open file descriptors of every replica
process at the start and the end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from serve_load import finqa, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--kb", type=int, default=200, help="knowledge-base passages")
    ap.add_argument("--no-kill", action="store_true", help="kill no replica")
    args = ap.parse_args()

    import ray

    from ray_ft.config import parse_job
    from ray_ft.models import resolve_model
    from ray_ft.serve.app import app_name, deploy, stop_serving
    from ray_ft.serve.soak import KINDS, kill_one_replica, soak, survivors

    _, docs = finqa(args.kb)
    ray.init(num_cpus=4, include_dashboard=False)
    cfg = parse_job({"name": "soak", "data": {"language": "en"}, "output_dir": tempfile.mkdtemp(prefix="ray_ft_soak_"),
                     "serve": {"http_port": free_port(), "max_tokens": 8, "top_k": 2,
                               "deployments": {"embedder": {"num_replicas": 2}}}})
    url = deploy(cfg, str(resolve_model("SmolLM2-135M-Instruct")), str(resolve_model("all-MiniLM-L6-v2")), {}, docs)
    app = app_name(cfg)
    try:
        report = soak(url, {}, app, "SmolLM2-135M-Instruct", 60 * args.minutes, args.concurrency,
                      None if args.no_kill else kill_one_replica(app, "EmbedderDeployment"))
    finally:
        stop_serving(cfg)
    print(json.dumps({"seconds": report.seconds, "concurrency": args.concurrency, "kb_passages": len(docs),
                      "killed": report.killed, "cpus": os.cpu_count()}))
    print("\n| kind | requests | failed | re-sent | p50 first (ms) | p50 last (ms) | p95 first (ms) | p95 last (ms) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in KINDS:
        ms = report.latency_ms[kind]
        print(f"| {kind} | {report.requests[kind]} | {report.failed[kind]} | {report.resent[kind]} | "
              f"{ms['p50_first']} | {ms['p50_last']} | {ms['p95_first']} | {ms['p95_last']} |")
    print("\n| replica process | pid | RSS start (MB) | RSS end (MB) | fds start | fds end |")
    print("|---|---:|---:|---:|---:|---:|")
    lived = survivors(report)
    for start, end in lived:
        print(f"| {start.title} | {start.pid} | {start.rss_mb} | {end.rss_mb} | {start.fds} | {end.fds} |")
    kept = {s.pid for s, _ in lived}
    for r in report.replicas_start:
        if r.pid not in kept:
            print(f"| {r.title} (killed) | {r.pid} | {r.rss_mb} | - | {r.fds} | - |")
    for r in report.replicas_end:
        if r.pid not in kept:
            print(f"| {r.title} (replacement) | {r.pid} | - | {r.rss_mb} | - | {r.fds} |")
    for f in report.failures[:20]:
        print("FAILURE", f)


if __name__ == "__main__":
    main()
