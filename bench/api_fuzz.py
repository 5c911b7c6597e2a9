"""schemathesis against a served RAG graph, with more examples than CI's bounded run
(tests/serve/test_api_fuzz.py): every operation of the published /openapi.json, valid requests and
requests broken on purpose, each checked by every schemathesis check (status and content type
documented, body matches the schema, no 5xx, schema-violating input refused, schema-valid input
accepted unless its 400 carries a documented limit code) within the request deadline. The graph
is the job defaults on a local Ray cluster (SmolLM2 on vLLM CPU, MiniLM, a LanceDB knowledge base
of 64 Financial-QA-10k contexts) with auth on, live adapters on and max_tokens capped at 32 so a
generated request stays seconds long. Document writes are fuzzed too (the graph is this run's own).

    .venv/bin/python bench/api_fuzz.py [--examples 100] [--max-tokens-limit 32]

Prints one row per operation and mode (requests sent, failures), then the failures, then whether
the app and every replica are still healthy.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import tempfile
import time

from serve_load import finqa, free_port


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=100, help="generated requests per operation and mode")
    ap.add_argument("--max-tokens-limit", type=int, default=32)
    args = ap.parse_args()

    import ray
    import schemathesis
    from ray import serve

    from ray_ft.config import parse_job
    from ray_ft.models import resolve_model
    from ray_ft.serve.app import app_name, deploy, stop_serving
    from ray_ft.testing import fuzz_api

    _, docs = finqa(64)
    token, env = secrets.token_hex(8), "RAY_FT_FUZZ_TOKEN"
    live_root = tempfile.mkdtemp(prefix="ray_ft_fuzz_adapters_")
    ray.init(num_cpus=4, include_dashboard=False)
    cfg = parse_job({"name": "apifuzz", "data": {"language": "en"}, "output_dir": tempfile.mkdtemp(prefix="ray_ft_fuzz_"),
                     "serve": {"http_port": free_port(), "max_tokens": 16, "max_tokens_limit": args.max_tokens_limit,
                               "auth_token_env": env, "knowledge_base": {"refresh_s": 0},
                               "live_adapters": {"enabled": True, "allowed_roots": [live_root]}}})
    os.environ[env] = token
    url = deploy(cfg, str(resolve_model("SmolLM2-135M-Instruct")), str(resolve_model("all-MiniLM-L6-v2")), {}, docs)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        schema = schemathesis.openapi.from_url(url + "/openapi.json", headers=headers)
        t0 = time.perf_counter()
        tried, failures = fuzz_api(schema, headers, args.examples, cfg.serve.request_timeout_s + 30,
                                   stop_on_failure=False)
        seconds = time.perf_counter() - t0
        app = serve.status().applications[app_name(cfg)]
        healthy = app.status == "RUNNING" and all(d.status == "HEALTHY" for d in app.deployments.values())
    finally:
        stop_serving(cfg)
    print(json.dumps({"examples_per_operation_and_mode": args.examples, "requests": sum(tried.values()),
                      "failures": len(failures), "seconds": round(seconds, 1), "healthy_after": healthy,
                      "cpus": os.cpu_count()}))
    print("\n| operation | mode | requests | failed |\n|---|---|---:|---:|")
    for key, n in tried.items():
        label, mode = key.rsplit(" ", 1)
        failed = sum(1 for f in failures if f.startswith(key + ":"))
        print(f"| {label} | {mode} | {n} | {failed} |")
    for f in failures:
        print("FAILURE", f)


if __name__ == "__main__":
    main()
