"""Calls from one deployment to another that survive a dying replica and respect a deadline.

When a replica dies (crash, OOM kill, node loss) the calls it was serving fail with a
`RayActorError`. Nothing was answered yet, so such a call is sent again: Serve's router picks a
live replica (or waits for the controller's replacement). Every other error is the callee's
answer and is passed on unchanged. The whole call, retries included, has one deadline; when it
passes the call is cancelled, so the callee stops working on it (vLLM aborts the sequence).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from ray.exceptions import RayActorError

from ray_ft.errors import RayFTError

log = logging.getLogger(__name__)


class UpstreamTimeout(RayFTError):
    """A deployment did not answer within the request timeout."""


class UpstreamUnavailable(RayFTError):
    """Every attempt of a call met a dying replica."""


def _cancel(response: Any) -> None:
    cancel = getattr(response, "cancel", None)
    if cancel is not None:
        cancel()


class Deadline:
    """One request's time budget, shared by all the calls it makes."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.end = asyncio.get_running_loop().time() + timeout_s

    def left(self, what: str) -> float:
        left = self.end - asyncio.get_running_loop().time()
        if left <= 0:
            raise UpstreamTimeout(f"{what} did not answer within {self.timeout_s:g} s")
        return left


async def call_with_retries(send: Callable[[], Awaitable], what: str, deadline: Deadline,
                            retries: int, backoff_s: float = 0.2, stats: dict | None = None) -> Any:
    """Await `send()` (a Serve DeploymentResponse or any awaitable); re-send it up to `retries`
    times when its replica dies; raise UpstreamTimeout past the deadline. `stats["retries"]`
    counts the re-sends (the ingress reports them in a response header)."""
    for attempt in range(retries + 1):
        left = deadline.left(what)
        response = send()
        try:
            return await asyncio.wait_for(_awaited(response), left)
        except asyncio.TimeoutError:
            _cancel(response)
            raise UpstreamTimeout(f"{what} did not answer within {deadline.timeout_s:g} s") from None
        except RayActorError as err:
            if attempt == retries:
                raise UpstreamUnavailable(
                    f"{what} unavailable: its replica died before answering, on {retries + 1} "
                    f"attempt(s) ({type(err).__name__})") from None
            log.warning("%s: replica died (%s); re-sending (%d/%d)", what, type(err).__name__,
                        attempt + 1, retries)
            if stats is not None:
                stats["retries"] = stats.get("retries", 0) + 1
            # Back off a little: the router needs a moment to learn the replica is gone.
            await asyncio.sleep(min(backoff_s * (attempt + 1), deadline.left(what)))
    raise AssertionError("unreachable")


async def _awaited(response: Any) -> Any:
    return await response


async def open_stream_with_retries(send: Callable[[], Any], what: str, deadline: Deadline,
                                   retries: int, stats: dict | None = None) -> tuple[Any, Any]:
    """Start a streamed call (`send()` returns an async iterator, e.g. a Serve
    DeploymentResponseGenerator) and wait for its first item, re-sending it when its replica dies
    before that item. Returns (first item, the iterator); errors before the first item (unknown
    model, oversize prompt) are raised here, so the caller can still answer with a 4xx."""
    async def first_item():
        stream = send()
        try:
            return await stream.__anext__(), stream
        except BaseException:
            _cancel(stream)
            raise

    return await call_with_retries(first_item, what, deadline, retries, stats=stats)


async def next_item(stream: Any, what: str, deadline: Deadline) -> Any:
    """The stream's next item within the deadline (StopAsyncIteration at its end)."""
    try:
        return await asyncio.wait_for(stream.__anext__(), deadline.left(what))
    except asyncio.TimeoutError:
        _cancel(stream)
        raise UpstreamTimeout(f"{what} did not finish within {deadline.timeout_s:g} s") from None
