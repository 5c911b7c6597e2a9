"""A bounded mixed load on a served graph for a fixed time, watching what a long run would show:
failed requests, latency drift (first vs last tenth of the run), and the resident memory and open
file descriptors of every replica process on this machine. Used by `bench/soak.py` (30 minutes)
and tests/serve/test_soak.py (2 minutes); optionally kills one replica half-way, which Serve
replaces while the ingress and retriever re-send what it held."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

KINDS = ("chat", "stream", "embeddings", "rag", "retrieve")


@dataclass(frozen=True)
class ReplicaUse:
    title: str  # ray::ServeReplica:APP:DEPLOYMENT
    pid: int
    rss_mb: float
    fds: int


@dataclass
class SoakReport:
    seconds: float
    requests: dict[str, int] = field(default_factory=dict)
    failed: dict[str, int] = field(default_factory=dict)
    resent: dict[str, int] = field(default_factory=dict)  # answers that carried x-ray-ft-retries
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)  # kind -> p50/p95 first/last
    replicas_start: list[ReplicaUse] = field(default_factory=list)
    replicas_end: list[ReplicaUse] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    killed: str | None = None


def replica_use(app: str) -> list[ReplicaUse]:
    """Memory and file descriptors of `app`'s replica processes on this machine."""
    import psutil

    out = []
    for proc in psutil.process_iter(["cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        if title.startswith(f"ray::ServeReplica:{app}:"):
            try:
                out.append(ReplicaUse(title.split()[0], proc.pid, round(proc.memory_info().rss / 2**20, 1),
                                      proc.num_fds()))
            except psutil.NoSuchProcess:
                continue
    return sorted(out, key=lambda r: (r.title, r.pid))


def _request(kind: str, i: int, model: str) -> tuple[str, dict]:
    question = f"What is the capital of France? ({i})"
    chat = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 8}
    return {
        "chat": ("/v1/chat/completions", chat),
        "stream": ("/v1/chat/completions", {**chat, "stream": True}),
        "embeddings": ("/v1/embeddings", {"input": [f"sentence {i}.{j} about rivers" for j in range(4)]}),
        "rag": ("/v1/rag", {"query": question, "max_tokens": 8}),
        "retrieve": ("/v1/retrieve", {"query": question, "top_k": 2}),
    }[kind]


def _percentiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q = statistics.quantiles(values, n=20, method="inclusive")
    return round(statistics.median(values), 1), round(q[18], 1)


async def _load(url: str, headers: dict, model: str, seconds: float, concurrency: int,
                kill: Callable[[], str] | None, timeout_s: float) -> tuple[list[tuple], str | None]:
    import httpx

    records: list[tuple] = []  # (start offset s, kind, latency ms, ok, resent, detail)
    t0 = time.monotonic()
    end = t0 + seconds
    killed: str | None = None
    counter = iter(range(10**9))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout_s, limits=limits) as http:
        async def worker():
            nonlocal killed
            while time.monotonic() < end:
                i = next(counter)
                kind = KINDS[i % len(KINDS)]
                path, body = _request(kind, i, model)
                start = time.monotonic()
                try:
                    resp = await http.post(path, json=body)
                    text = resp.text
                    ok = resp.status_code == 200 and (kind != "stream" or text.rstrip().endswith("data: [DONE]"))
                    resent = bool(resp.headers.get("x-ray-ft-retries"))
                    detail = "" if ok else f"{resp.status_code} {text[:200]}"
                except httpx.HTTPError as err:
                    ok, resent, detail = False, False, repr(err)
                records.append((start - t0, kind, 1000 * (time.monotonic() - start), ok, resent, detail))
                if kill is not None and killed is None and time.monotonic() - t0 >= seconds / 2:
                    killed = "pending"
                    killed = await asyncio.to_thread(kill)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return records, killed


def soak(url: str, headers: dict, app: str, model: str, seconds: float, concurrency: int = 4,
         kill: Callable[[], str] | None = None, timeout_s: float = 120.0) -> SoakReport:
    """Run the mixed load (chat, streamed chat, embeddings, rag, retrieve in turn) for `seconds`
    with `concurrency` requests in flight; `kill()` (returns what it killed) runs once half-way."""
    start_use = replica_use(app)
    t0 = time.monotonic()
    records, killed = asyncio.run(_load(url, headers, model, seconds, concurrency, kill, timeout_s))
    report = SoakReport(seconds=round(time.monotonic() - t0, 1), replicas_start=start_use,
                        replicas_end=replica_use(app), killed=killed)
    tenth = seconds / 10
    for kind in KINDS:
        mine = [r for r in records if r[1] == kind]
        report.requests[kind] = len(mine)
        report.failed[kind] = sum(1 for r in mine if not r[3])
        report.resent[kind] = sum(1 for r in mine if r[4])
        first = [r[2] for r in mine if r[0] < tenth and r[3]]
        last = [r[2] for r in mine if r[0] >= seconds - tenth and r[3]]
        (p50f, p95f), (p50l, p95l) = _percentiles(first), _percentiles(last)
        report.latency_ms[kind] = {"p50_first": p50f, "p95_first": p95f, "p50_last": p50l, "p95_last": p95l}
        report.failures += [f"{kind} at {r[0]:.1f}s: {r[5]}" for r in mine if not r[3]]
    return report


def kill_one_replica(app: str, deployment: str) -> Callable[[], str]:
    """A `kill` for `soak`: ray.kill one live replica actor of `deployment` (Serve replaces it)."""

    def kill() -> str:
        import ray
        from ray.util.state import list_actors

        alive = list_actors(filters=[("class_name", "=", f"ServeReplica:{app}:{deployment}"), ("state", "=", "ALIVE")])
        victim = alive[0]
        ray.kill(ray.get_actor(victim.name, namespace="serve"), no_restart=True)
        return f"{deployment} replica {victim.name} (pid {victim.pid})"

    return kill


def survivors(report: SoakReport) -> list[tuple[ReplicaUse, ReplicaUse]]:
    """(start, end) use of every replica process alive at both ends of the run."""
    end = {r.pid: r for r in report.replicas_end}
    return [(r, end[r.pid]) for r in report.replicas_start if r.pid in end]
