"""Load on ray_ft's served RAG graph over loopback: /v1/embeddings with the embedder's
`@serve.batch` on vs off, side by side, and /v1/rag; requests/s and p50/p95 latency.

First the embedder alone, in-process: ms per text at 1 vs 32 texts per call (the most batching
can gain). Then one graph is deployed on a local Ray cluster (1 replica per deployment, the job defaults:
SmolLM2 on vLLM, MiniLM), its knowledge base the first `--kb` contexts of Financial-QA-10k.
The embedder's batching is switched between rounds through its `reconfigure` (the deployment's
user_config, as `serve deploy` would), so both settings run on the same replica, alternating:
batched, unbatched, batched, unbatched, ... Each request embeds one question (one text). Every
phase is bounded: a fixed number of requests and a time cap (a phase that hits the cap reports
how many requests it finished). Failed requests are counted and printed; they must be 0.

`--direct-ingress` runs the same load with no Serve proxy in the path: Ray Serve's
RAY_SERVE_ENABLE_DIRECT_INGRESS flag makes the ingress replica listen on its own port (pinned here
to one free port). It shows what the proxy hop costs and whether it limits the batching ratio.

    .venv/bin/python bench/serve_load.py [--embed-requests 600] [--concurrency 32] [--rounds 2]
        [--rag-requests 48] [--rag-concurrency 8] [--max-tokens 32] [--time-cap-s 120] [--direct-ingress]
        [--rerank runs/financial_rerank/rerank/model [--rerank-candidates 20]] [--skip-embed]
        [--retrieve-requests 400 [--retrieve-modes dense bm25 hybrid]] [--skip-rag]

`--retrieve-requests N` adds a /v1/retrieve phase: the retriever's ranking mode is switched on the
running replica (its `reconfigure`, Serve's user_config) and each mode serves the same questions.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import socket
import statistics
import time
from pathlib import Path

import httpx

FINQA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


def finqa(n: int) -> tuple[list[str], list[dict]]:
    """The first n distinct contexts (as documents) and every question."""
    with FINQA.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    docs, seen = [], set()
    for r in rows:
        if r["context"] not in seen and len(docs) < n:
            seen.add(r["context"])
            docs.append({"passage_id": f"p{len(docs)}", "text": r["context"]})
    return [r["question"] for r in rows], docs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def load(url: str, path: str, bodies: list[dict], concurrency: int, time_cap_s: float) -> dict:
    """POST every body with `concurrency` in flight; per-request latency, failures, wall time."""
    latencies, failures, queue = [], [], list(reversed(bodies))
    deadline = time.perf_counter() + time_cap_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=time_cap_s, limits=limits) as http:
        async def worker():
            while queue and time.perf_counter() < deadline:
                body = queue.pop()
                t0 = time.perf_counter()
                try:
                    resp = await http.post(path, json=body)
                    if resp.status_code != 200:
                        failures.append(f"{resp.status_code}: {resp.text[:200]}")
                        continue
                except httpx.HTTPError as err:
                    failures.append(repr(err))
                    continue
                latencies.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    lat = sorted(latencies)
    return {"requests": len(bodies), "done": len(lat), "failed": len(failures), "wall_s": wall,
            "rps": len(lat) / wall, "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * lat[max(0, int(round(0.95 * len(lat))) - 1)],
            "first_failures": failures[:3]}


def model_ceiling(questions: list[str], dtype: str, threads: int) -> dict:
    """The embedder alone, in this process before anything is deployed: ms per text encoding one
    text per call vs 32 per call. Their ratio bounds what batching can gain behind HTTP.

    A call costs about `fixed + per_token * tokens` (tokens padded to the call's longest text);
    fitted on the two sizes, `single / (per_token * mean tokens)` is what an unbounded batch of
    unpadded texts could gain at most: the per-token compute is paid however texts are batched.
    """
    import torch

    from ray_ft.models import resolve_model
    from ray_ft.embedder import SentenceTransformerEmbedder

    torch.set_num_threads(threads or os.cpu_count() or 1)
    emb = SentenceTransformerEmbedder(str(resolve_model("all-MiniLM-L6-v2")), dtype=dtype)
    lengths = [len(ids) for ids in emb.model.tokenizer(questions[:320])["input_ids"]]
    emb.embed(questions[:64])  # warm-up
    t0 = time.perf_counter()
    for q in questions[:100]:
        emb.embed([q])
    single = (time.perf_counter() - t0) / 100
    t0 = time.perf_counter()
    for i in range(0, 320, 32):
        emb.embed(questions[i:i + 32])
    batch = (time.perf_counter() - t0) / 320
    single_tokens = statistics.mean(lengths[:100])
    batch_tokens = statistics.mean(32 * max(lengths[i:i + 32]) for i in range(0, 320, 32))
    per_token = (32 * batch - single) / (batch_tokens - single_tokens)
    return {"single_ms_per_text": round(1000 * single, 2), "batch32_ms_per_text": round(1000 * batch, 2),
            "ratio": round(single / batch, 2), "fixed_ms_per_call": round(1000 * (single - per_token * single_tokens), 2),
            "per_token_ms": round(1000 * per_token, 4), "mean_tokens": round(single_tokens, 1),
            "unbounded_batch_ratio": round(single / (per_token * single_tokens), 2)}


def retrieve_phase(cfg, url: str, questions: list[str], args) -> None:
    """/v1/retrieve (top 5) per ranking mode, switched on the running retriever replica through its
    `reconfigure` (Serve's user_config), each mode on the same questions, at concurrency 1 and
    `--concurrency`; the retriever replica's resident memory after each mode."""
    from ray import serve

    from ray_ft.serve.app import app_name

    retriever = serve.get_deployment_handle("RetrieverDeployment", app_name=app_name(cfg))
    base = cfg.serve.retrieval_for(cfg.data.language).model_dump()
    print(f"\n| /v1/retrieve (top 5, {args.kb} passages) | mode | concurrency | requests | failed | requests/s "
          "| p50 (ms) | p95 (ms) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for mode in args.retrieve_modes:
        retriever.reconfigure.remote({"retrieval": {**base, "mode": mode}}).result()
        asyncio.run(load(url, "/v1/retrieve", [{"query": q, "top_k": 5} for q in questions[-32:]], 4, 60))  # warm-up
        for conc in sorted({1, args.concurrency}):
            n = args.retrieve_requests // 4 if conc == 1 else args.retrieve_requests
            bodies = [{"query": questions[i], "top_k": 5} for i in range(n)]
            res = asyncio.run(load(url, "/v1/retrieve", bodies, conc, args.time_cap_s))
            print(f"| LanceDB | {mode} | {conc} | {res['done']}/{n} | {res['failed']} | {res['rps']:.1f} | "
                  f"{res['p50_ms']:.1f} | {res['p95_ms']:.1f} |")
            if res["failed"]:
                print("failures:", res["first_failures"])
    from ray_ft.serve.soak import replica_use

    rss = [r.rss_mb for r in replica_use(app_name(cfg)) if r.title.endswith(":RetrieverDeployment")]
    print(json.dumps({"retriever_replica_rss_mb": rss}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--embed-requests", type=int, default=600, help="requests per embeddings round")
    ap.add_argument("--concurrency", type=int, default=32, help="embeddings requests in flight")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per batching setting (alternating)")
    ap.add_argument("--max-batch-size", type=int, default=32, help="batched setting: requests per model call")
    ap.add_argument("--batch-wait-s", type=float, default=0.005, help="batched setting: batch_wait_timeout_s")
    ap.add_argument("--rag-requests", type=int, default=48, help="/v1/rag requests per concurrency level")
    ap.add_argument("--rag-concurrency", type=int, default=8, help="/v1/rag requests in flight")
    ap.add_argument("--max-tokens", type=int, default=32, help="/v1/rag completion length")
    ap.add_argument("--kb", type=int, default=200, help="knowledge-base passages")
    ap.add_argument("--time-cap-s", type=float, default=120.0, help="cap per phase")
    ap.add_argument("--embedder-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--embedder-threads", type=int, default=0, help="torch threads (0: all cores)")
    ap.add_argument("--retrieve-requests", type=int, default=0,
                    help="/v1/retrieve requests per ranking mode and concurrency level (0: no retrieve phase)")
    ap.add_argument("--retrieve-modes", nargs="+", default=["dense", "bm25", "hybrid"],
                    choices=["dense", "bm25", "hybrid"], help="ranking modes of the retrieve phase")
    ap.add_argument("--skip-rag", action="store_true", help="no /v1/rag phase")
    ap.add_argument("--skip-embed", action="store_true", help="only /v1/rag (no embeddings rounds)")
    ap.add_argument("--rerank", default=None, metavar="FOLDER",
                    help="serve this cross-encoder (serve.rerank) and time /v1/rag with and without it, "
                         "alternating on the same deployment (the request's \"rerank\" flag)")
    ap.add_argument("--rerank-candidates", type=int, default=20, help="passages the retriever fetches for it")
    ap.add_argument("--direct-ingress", action="store_true",
                    help="no Serve proxy: the ingress replica listens itself (Ray's experimental flag)")
    args = ap.parse_args()
    http_port = free_port()
    if args.direct_ingress:
        # Read by Serve at import in every process of the cluster, so set before ray.init. A
        # one-port range makes the ingress replica listen where requests are sent; it must differ
        # from the (unused) proxy port, which Serve still reserves.
        ingress_port = next(p for p in iter(free_port, None) if p != http_port)
        os.environ.update({"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
                           "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(ingress_port),
                           "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(ingress_port + 1)})  # exclusive

    import ray
    from ray import serve

    from ray_ft.config import parse_job
    from ray_ft.models import resolve_model
    from ray_ft.serve.app import app_name, deploy

    questions, docs = finqa(args.kb)
    print(json.dumps({"model_alone_in_process": model_ceiling(questions, args.embedder_dtype, args.embedder_threads)}))
    ray.init(num_cpus=4, include_dashboard=False)
    cfg = parse_job({"name": "serveload", "data": {"language": "en"},
                     "serve": {"http_port": http_port, "max_tokens": args.max_tokens, "top_k": 1,
                               "embedder_dtype": args.embedder_dtype, "embedder_threads": args.embedder_threads,
                               "embedder_batching": {"max_batch_size": args.max_batch_size,
                                                     "batch_wait_timeout_s": args.batch_wait_s},
                               **({"rerank": {"enabled": True, "model": args.rerank,
                                              "candidates": args.rerank_candidates}} if args.rerank else {})}})
    t0 = time.perf_counter()
    url = deploy(cfg, str(resolve_model("SmolLM2-135M-Instruct")), str(resolve_model("all-MiniLM-L6-v2")),
                 {}, docs, reranker_dir=args.rerank)
    if args.direct_ingress:
        url = f"http://127.0.0.1:{ingress_port}"
    print(json.dumps({"deploy_s": round(time.perf_counter() - t0, 1), "kb_passages": len(docs),
                      "cpus": os.cpu_count(), "direct_ingress": args.direct_ingress, "embedder_dtype": args.embedder_dtype,
                      "embedder_threads": args.embedder_threads or os.cpu_count(),
                      "embed_requests": args.embed_requests, "concurrency": args.concurrency,
                      "rag_requests": args.rag_requests, "max_tokens": args.max_tokens}))
    embedder = serve.get_deployment_handle("EmbedderDeployment", app_name=app_name(cfg))
    settings = {"batched": {"max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_s},
                "unbatched": {"max_batch_size": 1, "batch_wait_timeout_s": 0.0}}

    asyncio.run(load(url, "/v1/embeddings", [{"input": q} for q in questions[:64]], 8, 60))  # warm-up
    rows: dict[str, list[dict]] = {k: [] for k in settings}
    offset = 64
    for r in range(0 if args.skip_embed else args.rounds):
        for name, batching in settings.items():
            embedder.reconfigure.remote(batching).result()
            before = embedder.batch_stats.remote().result()
            bodies = [{"input": questions[(offset + i) % len(questions)]} for i in range(args.embed_requests)]
            offset += args.embed_requests
            res = asyncio.run(load(url, "/v1/embeddings", bodies, args.concurrency, args.time_cap_s))
            after = embedder.batch_stats.remote().result()
            calls = max(1, after["model_calls"] - before["model_calls"])
            res["mean_batch"] = (after["requests"] - before["requests"]) / calls
            res["model_ms_per_call"] = 1000 * (after["model_s"] - before["model_s"]) / calls
            rows[name].append(res)
            print(json.dumps({"round": r, "setting": name, **{k: round(v, 2) if isinstance(v, float) else v
                                                               for k, v in res.items()}}))

    if not args.skip_embed:
        print("\n| /v1/embeddings (1 text per request) | concurrency | requests | failed | requests/s | p50 (ms) | p95 (ms) | mean batch |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        mean = {}
        for name, res in rows.items():
            mean[name] = {k: statistics.mean(x[k] for x in res) for k in ("rps", "p50_ms", "p95_ms", "mean_batch")}
            print(f"| {name} ({args.rounds} rounds, mean) | {args.concurrency} | {sum(x['done'] for x in res)} | "
                  f"{sum(x['failed'] for x in res)} | {mean[name]['rps']:.1f} | {mean[name]['p50_ms']:.1f} | "
                  f"{mean[name]['p95_ms']:.1f} | {mean[name]['mean_batch']:.1f} |")
        print(f"\nbatched / unbatched requests/s: {mean['batched']['rps'] / mean['unbatched']['rps']:.2f}x; "
              f"p95 latency unbatched / batched: {mean['unbatched']['p95_ms'] / mean['batched']['p95_ms']:.2f}x")

    # /v1/rag: retrieval (embedder, batched again) + generation (vLLM batches concurrent sequences).
    embedder.reconfigure.remote(settings["batched"]).result()
    if args.retrieve_requests:
        retrieve_phase(cfg, url, questions, args)
    if args.skip_rag:
        return
    print("\n| /v1/rag (retrieve top-1 + generate) | concurrency | requests | failed | requests/s | p50 (s) | p95 (s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    # With a reranker the two paths alternate on the same deployment, each on the same questions.
    paths = [(f" + rerank top {args.rerank_candidates}", True), ("", False)] if args.rerank else [("", None)]
    for conc in sorted({1, args.rag_concurrency}):
        n = args.rag_requests // 4 if conc == 1 else args.rag_requests
        for label, rerank in paths:
            bodies = [{"query": questions[i], "max_tokens": args.max_tokens,
                       **({} if rerank is None else {"rerank": rerank})} for i in range(n)]
            res = asyncio.run(load(url, "/v1/rag", bodies, conc, args.time_cap_s))
            print(f"| max_tokens={args.max_tokens}{label} | {conc} | {res['done']}/{n} | {res['failed']} | "
                  f"{res['rps']:.2f} | {res['p50_ms'] / 1000:.2f} | {res['p95_ms'] / 1000:.2f} |")
            if res["failed"]:
                print("failures:", res["first_failures"])
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
