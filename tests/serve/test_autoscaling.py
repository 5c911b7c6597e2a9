"""Autoscaling from the job's serve.deployments: the served retriever (1-2 replicas, target 1
request in flight per replica) shrinks to its minimum when idle and grows to its maximum under load."""

import asyncio
import time

import httpx
import pytest


def _running(deployment: str) -> int:
    from ray import serve

    return serve.status().applications["servetest"].deployments[deployment].replica_states.get("RUNNING", 0)


@pytest.mark.slow
def test_retriever_scales_down_when_idle_and_up_to_max_replicas_under_load(served):
    # Earlier tests' concurrent requests may have scaled it up: idle, it returns to min_replicas.
    deadline = time.monotonic() + 90
    while _running("RetrieverDeployment") != 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert _running("RetrieverDeployment") == 1

    async def load_until_scaled(cap_s: float) -> tuple[int, int]:
        done, failed, end = 0, 0, time.monotonic() + cap_s
        async with httpx.AsyncClient(base_url=served.url, headers=served.headers, timeout=60) as http:
            async def worker(i):
                nonlocal done, failed
                while time.monotonic() < end and _running_cached["n"] < 2:
                    resp = await http.post("/v1/retrieve", json={"query": f"Which river? {i}-{done}", "rerank": False})
                    done, failed = done + 1, failed + (resp.status_code != 200)

            async def watch():
                while time.monotonic() < end and _running_cached["n"] < 2:
                    _running_cached["n"] = await asyncio.to_thread(_running, "RetrieverDeployment")
                    await asyncio.sleep(0.5)

            await asyncio.gather(watch(), *(worker(i) for i in range(8)))
        return done, failed

    _running_cached = {"n": 1}
    done, failed = asyncio.run(load_until_scaled(cap_s=90))
    assert failed == 0 and done > 0
    assert _running("RetrieverDeployment") == 2  # max_replicas, never more
