"""QA generation throughput: Ray Data batch inference vs one request at a time, same engine.

Both sides write questions and answers for the same nodes (the shipped corpus jobs/documents/ cut
as jobs/docs_radit.yaml cuts it) with that job's writer (qa_generation.model) on vLLM's CPU build,
its engine arguments and prompts, greedy decoding and the same JSON schemas:

  batch      VLLMWriter: one vLLM engine in a Ray Data actor writes each batch of
             qa_generation.batch_size nodes' questions, then their answers; the wall time includes
             the engine's start.
  one-by-one the same vLLM engine behind its OpenAI server, called through EndpointWriter with
             concurrency 1 (the next request leaves when the last reply is in); the server is
             started before the clock runs, so this side's time holds no engine start.
  endpoint16 the same server with 16 requests in flight (continuous batching in the server).

    .venv/bin/python bench/qa_generation_throughput.py [--nodes 24] [--questions-per-node 4]

Prints requests, kept questions, generated tokens, wall seconds and questions/s per side, and
the batch / one-by-one ratio.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def corpus_nodes(group, n: int) -> list[dict]:
    from ray_ft.data.documents import list_documents, parse_document
    from ray_ft.data.nodes import document_nodes
    from ray_ft.data.sources import read_bytes

    nodes = [nd for s, name in list_documents([str(ROOT / "jobs" / "documents")])
             for nd in document_nodes(parse_document(s, name, read_bytes(s)), group)]
    return nodes[:n]


def start_server(model_dir: str, engine: dict, env: dict) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
           "--served-model-name", "writer", "--host", "127.0.0.1", "--port", str(port),
           "--dtype", engine["dtype"], "--max-model-len", str(engine["max_model_len"]),
           "--max-num-seqs", str(engine["max_num_seqs"]), "--enable-prefix-caching"]
    if engine["enforce_eager"]:
        cmd.append("--enforce-eager")
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"vLLM server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(1)
    proc.kill()
    raise SystemExit("vLLM server did not start in 600 s")


def run_side(name: str, nodes: list[dict], writer, gen) -> dict:
    from ray_ft.data.qa_generation import generate_qa

    t = time.perf_counter()
    rows, counts = generate_qa(nodes, writer, gen, "en")
    wall = time.perf_counter() - t
    requests = len(nodes) + counts.questions_parsed
    out = {"side": name, "requests": requests, "kept": len(rows), "generated_tokens": counts.generated_tokens,
           "wall_s": round(wall, 1), "requests_per_s": round(requests / wall, 3),
           "questions_per_s": round(len(rows) / wall, 3)}
    print(out, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=24)
    ap.add_argument("--questions-per-node", type=int, default=4)
    args = ap.parse_args()

    import ray

    from ray_ft.config import QAGenerationConfig, load_job
    from ray_ft.data.qa_writers import EndpointWriter, VLLMWriter
    from ray_ft.engine_args import cpu_engine_env
    from ray_ft.models import resolve_model

    ray.init(num_cpus=4, include_dashboard=False)
    job = load_job(ROOT / "jobs" / "docs_radit.yaml")
    nodes = corpus_nodes(job.data.document_nodes, args.nodes)
    writer_name = job.data.qa_generation.model or job.model.name
    model_dir = str(resolve_model(writer_name))
    vcfg = job.serve.vllm
    gen = job.data.qa_generation.model_copy(update={"questions_per_node": args.questions_per_node})
    writer = VLLMWriter(model_dir, vcfg, job.model.system_prompt, False)
    sides = [run_side("batch (Ray Data vLLM)", nodes, writer, gen)]
    engine = writer.engine_kwargs(gen)  # the server runs the batch side's engine settings
    t = time.perf_counter()
    proc, url = start_server(model_dir, engine, cpu_engine_env(vcfg))
    print(f"vLLM server up in {time.perf_counter() - t:.0f} s", flush=True)
    try:
        for name, conc in (("one-by-one (endpoint, 1 in flight)", 1), ("endpoint, 16 in flight", 16)):
            g = QAGenerationConfig.model_validate(
                {**gen.model_dump(), "endpoint": {"base_url": url, "model": "writer", "concurrency": conc}})
            sides.append(run_side(name, nodes, EndpointWriter(), g))
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"\nnodes={len(nodes)} questions_per_node={args.questions_per_node} writer={writer_name} "
          f"dtype={engine['dtype']} cpus={os.cpu_count()}")
    print(f"{'side':40s} {'requests':>8s} {'kept':>5s} {'tokens':>7s} {'wall_s':>7s} {'req/s':>6s} {'q/s':>6s}")
    for s in sides:
        print(f"{s['side']:40s} {s['requests']:8d} {s['kept']:5d} {s['generated_tokens']:7d} {s['wall_s']:7.1f} "
              f"{s['requests_per_s']:6.2f} {s['questions_per_s']:6.2f}")
    base = sides[1]
    print(f"batch / one-by-one: {base['wall_s'] / sides[0]['wall_s']:.2f}x in wall time (requests/s ratio "
          f"{sides[0]['requests_per_s'] / base['requests_per_s']:.2f}x)")


if __name__ == "__main__":
    main()
