"""Questions/s of ray_ft's batched scorer vs the seed recipe's per-pair loop, same rows, one run.

The seed scores each (prediction, reference) pair with its own call to a served embedder, then
the string metrics. `ray_ft.eval.scoring.score_rows` embeds each distinct text once, in
length-sorted batches. Two settings, same rows, same MiniLM:
- served: through ray_ft's Ray Serve graph (`POST /v1/embeddings`), as the eval runner scores and
  as the seed did (one HTTP request per pair vs one per batch of 128 texts);
- in-process: the embedder called directly, which isolates batching + dedup from HTTP overhead.
Both scorers must give the same scores (checked: cosine within 1e-5, string metrics identical).

    .venv/bin/python bench/eval_speed.py [--predictions runs/X/eval/predictions.jsonl] [--limit N]
                                         [--skip-served]

Without --predictions the rows are built from CMRC2018 dev: every question with, as the
"prediction" of two models, its first reference answer and the first 20 characters of its context
(so references repeat across models, as in a comparison run).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from ray_ft.data.readers import read_qa_source
from ray_ft.metrics.qa import (
    clipped_cosine, cmrc_exact_match, cmrc_f1, exact_match, origin_char_score, origin_score,
)
from ray_ft.eval.scoring import score_rows
from ray_ft.io import read_jsonl
from ray_ft.models import resolve_model
from ray_ft.embedder import SentenceTransformerEmbedder

CMRC = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "cmrc2018" / "cmrc2018_dev.json"


def cmrc_rows(limit: int) -> list[dict]:
    rows = []
    for r in read_qa_source(str(CMRC))[: limit // 2]:
        for model, pred in (("a", r.answers[0]), ("b", r.context[:20])):
            rows.append({"model": model, "mode": "gold", "prediction": pred,
                         "references": r.answers, "context": r.context})
    return rows


def seed_loop(rows: list[dict], embed) -> list[dict]:
    """The seed's way: one embedder call per (prediction, reference) pair."""
    for r in rows:
        pred, refs = r["prediction"], r["references"]
        vecs = embed([pred, refs[0]])
        r["cosine"] = float(clipped_cosine(vecs[:1], vecs[1:])[0]) if pred.strip() else 0.0
        r["em"] = exact_match(pred, refs)
        r["cmrc_em"], r["cmrc_f1"] = cmrc_exact_match(pred, refs), cmrc_f1(pred, refs)
        r["origin"], r["origin_char"] = origin_score(pred, r["context"]), origin_char_score(pred, r["context"])
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--predictions", type=Path, help="predictions.jsonl of an eval run")
    ap.add_argument("--limit", type=int, default=2000, help="rows scored (default 2000)")
    ap.add_argument("--skip-served", action="store_true", help="only the in-process comparison")
    args = ap.parse_args()
    rows = (read_jsonl(args.predictions)[: args.limit] if args.predictions else cmrc_rows(args.limit))
    embedder = SentenceTransformerEmbedder(str(resolve_model("all-MiniLM-L6-v2")), batch_size=128)
    embedder.embed(["warm-up"])
    distinct = len({r["prediction"] for r in rows} | {r["references"][0] for r in rows})

    settings = [("in-process", embedder.embed)]
    if not args.skip_served:
        settings.append(("served", serve_graph()))
    print(json.dumps({"rows": len(rows), "distinct_texts": distinct, "torch_threads": torch.get_num_threads(),
                      "source": str(args.predictions or CMRC)}))
    print("| embedder | scorer | rows | seconds | questions/s | speed-up |\n|---|---|---:|---:|---:|---:|")
    for setting, embed in settings:
        timings, results = {}, {}
        for name, fn in (("seed per-pair loop", seed_loop), ("ray_ft batched", score_rows)):
            work = copy.deepcopy(rows)
            t0 = time.perf_counter()
            results[name] = fn(work, embed)
            timings[name] = time.perf_counter() - t0
        seed, ours = results["seed per-pair loop"], results["ray_ft batched"]
        np.testing.assert_allclose([r["cosine"] for r in ours], [r["cosine"] for r in seed], atol=1e-5)
        for key in ("em", "cmrc_em", "cmrc_f1", "origin", "origin_char"):
            assert [r[key] for r in ours] == [r[key] for r in seed], key
        base = timings["seed per-pair loop"]
        for name, s in timings.items():
            print(f"| {setting} | {name} | {len(rows)} | {s:.2f} | {len(rows) / s:.1f} | {base / s:.1f}x |")


def serve_graph():
    """Deploy ray_ft's graph on a local Ray cluster (knowledge base: 3 tiny passages); return the
    `/v1/embeddings` client's embed function."""
    import ray

    from ray_ft.config import parse_job
    from ray_ft.eval.clients import RAGClient
    from ray_ft.serve.app import deploy

    ray.init(num_cpus=4, include_dashboard=False)
    cfg = parse_job({"name": "evalspeed", "serve": {"http_port": 8799}})
    docs = [{"passage_id": str(i), "text": t} for i, t in enumerate(["a", "b", "c"])]
    url = deploy(cfg, str(resolve_model("SmolLM2-135M-Instruct")), str(resolve_model("all-MiniLM-L6-v2")),
                 {}, docs)
    return RAGClient(url).embed

if __name__ == "__main__":
    main()
