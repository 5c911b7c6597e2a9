"""Score the served RAG graph over an eval set, per model and per context mode.

Modes: "gold" sends the question's own passage (`/v1/rag` with `contexts`), the recipe's
100%-recall control; "retrieved" lets the served retriever pick the passages. Requests are sent
concurrently so the engine batches them, ordered by passage so its prefix cache is reused.
Outputs: per-item JSONL, a summary JSON and a Markdown table, each written atomically.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from tqdm import tqdm

from ray_ft.eval.metrics import clipped_cosine, exact_match, origin_score, percentile
from ray_ft.errors import RayFTError
from ray_ft.io import write_jsonl_atomic, write_text_atomic


@dataclass(frozen=True)
class EvalTarget:
    label: str  # how the report names it ("base", "finetuned")
    served_name: str  # the `model` field sent to the server


class RAGClient:
    """Thin HTTP client of the ingress; raises RayFTError with the server's message on 4xx/5xx."""

    def __init__(self, base_url: str, timeout_s: float = 600.0):
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s)

    def _post(self, path: str, body: dict) -> dict:
        resp = self.http.post(path, json=body)
        if resp.status_code >= 400:
            raise RayFTError(f"POST {path} -> {resp.status_code}: {resp.text[:300]}")
        return resp.json()

    def rag(self, query: str, model: str, contexts: list[str] | None = None, **kw) -> dict:
        body = {"query": query, "model": model, **kw}
        if contexts is not None:
            body["contexts"] = contexts
        return self._post("/v1/rag", body)

    def embed(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch_size):
            data = self._post("/v1/embeddings", {"input": texts[i:i + batch_size]})["data"]
            out.extend(d["embedding"] for d in sorted(data, key=lambda d: d["index"]))
        return np.asarray(out, dtype=np.float32)

    def models(self) -> list[str]:
        return [m["id"] for m in self.http.get("/v1/models").json()["data"]]


def predict(client: RAGClient, items: list[dict], target: EvalTarget, mode: str, concurrency: int,
            max_tokens: int | None = None) -> tuple[list[dict], float]:
    """One served answer per item, and the wall time it took; rows carry what the scorer needs."""
    extra = {"max_tokens": max_tokens} if max_tokens else {}

    def one(i: int) -> dict:
        it = items[i]
        gold = [it["context"]] if mode == "gold" else None
        out = client.rag(it["question"], target.served_name, contexts=gold, **extra)
        seen = [c["text"] for c in out["contexts"]]
        return {
            "id": it["id"], "model": target.label, "served_model": out["model"], "mode": mode,
            "question": it["question"], "references": it["answers"], "prediction": out["answer"],
            "context": "\n\n".join(seen), "gold_passage_id": it["passage_id"],
            "retrieved_ids": [c["node_id"] for c in out["contexts"] if c["node_id"]],
            "latency_s": out["retrieval_latency_s"] + out["generation_latency_s"],
            "completion_tokens": out["completion_tokens"],
        }

    # Two waves: the first question of each passage, then the rest. Requests for one passage
    # that arrive together are all prefilled from scratch; after the first wave the engine's
    # prefix cache holds every passage and the second wave only pays for the question and decode.
    first: dict[str, int] = {}
    for i, it in enumerate(items):
        first.setdefault(it["passage_id"], i)
    wave1 = sorted(first.values())
    in_wave1 = set(wave1)
    wave2 = [i for i in range(len(items)) if i not in in_wave1]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(items), desc=f"eval {target.label}/{mode}", unit="q") as bar:
        rows = []
        for wave in (wave1, wave2):
            for row in pool.map(one, wave):
                rows.append(row)
                bar.update()
    return sorted(rows, key=lambda r: r["id"]), time.perf_counter() - t0


def score(rows: list[dict], client: RAGClient) -> list[dict]:
    """Add em, cosine and origin to each row; cosine embeds all pairs in batches."""
    preds = client.embed([r["prediction"] for r in rows])
    refs = client.embed([r["references"][0] for r in rows])
    cos = clipped_cosine(preds, refs)
    for r, c in zip(rows, cos):
        r["em"] = exact_match(r["prediction"], r["references"])
        r["cosine"] = float(c)
        r["origin"] = origin_score(r["prediction"], r["context"])
        if r["mode"] == "retrieved":
            r["context_hit"] = float(any(i.split(":")[0] == r["gold_passage_id"] for i in r["retrieved_ids"]))
    return rows


def summarize(rows: list[dict], wall_s: dict[tuple[str, str], float] | None = None) -> list[dict]:
    """One row per (model, mode); `wall_s` (the time each group's requests took) adds req/s."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    table = []
    for (model, mode), rs in groups.items():
        lat = [r["latency_s"] for r in rs]
        row = {
            "model": model, "mode": mode, "n": len(rs),
            "em": float(np.mean([r["em"] for r in rs])),
            "cosine": float(np.mean([r["cosine"] for r in rs])),
            "origin": float(np.mean([r["origin"] for r in rs])),
            "context_hit": float(np.mean([r["context_hit"] for r in rs])) if mode == "retrieved" else None,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "throughput_rps": len(rs) / wall_s[(model, mode)] if wall_s else None,
        }
        table.append(row)
    return sorted(table, key=lambda t: (t["mode"], t["model"]))


def to_markdown(table: list[dict]) -> str:
    head = ("| model | mode | n | EM | cosine | origin | context hit | p50 latency (s) | p95 latency (s) "
            "| req/s |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for t in table:
        hit = "—" if t["context_hit"] is None else f"{100 * t['context_hit']:.1f}%"
        rps = "—" if t.get("throughput_rps") is None else f"{t['throughput_rps']:.2f}"
        lines.append(
            f"| {t['model']} | {t['mode']} | {t['n']} | {100 * t['em']:.1f}% | {t['cosine']:.3f} | "
            f"{100 * t['origin']:.1f}% | {hit} | {t['latency_p50_s']:.2f} | {t['latency_p95_s']:.2f} | {rps} |")
    return head + "\n".join(lines) + "\n"


def run_eval(client: RAGClient, items: list[dict], targets: list[EvalTarget], modes: list[str],
             concurrency: int, out_dir: Path) -> list[dict]:
    """Predict and score every (target, mode); write predictions.jsonl, summary.json, summary.md."""
    served = set(client.models())
    missing = [t.served_name for t in targets if t.served_name not in served]
    if missing:
        raise RayFTError(f"models not served: {missing}; served: {sorted(served)}")
    rows: list[dict] = []
    wall_s: dict[tuple[str, str], float] = {}
    for mode in modes:
        for target in targets:
            got, wall_s[(target.label, mode)] = predict(client, items, target, mode, concurrency)
            rows.extend(got)
    rows = score(rows, client)
    table = summarize(rows, wall_s)
    write_jsonl_atomic(out_dir / "predictions.jsonl", rows)
    write_text_atomic(out_dir / "summary.json", json.dumps(table, indent=2))
    write_text_atomic(out_dir / "summary.md", to_markdown(table))
    return table
