"""Fault injection for the failure tests, switched on by the environment only.

`RAY_FT_TEST_FAULTS` (JSON, read in the driver when a run is launched and handed to the workers
in the loop config) makes one worker fail once after a given step:

    {"after_step": 3, "rank": 1, "how": "sigkill" | "raise", "marker": "/tmp/x/.failed_once"}

`sigkill` ends the process with no cleanup, as a node loss would; `raise` is an exception in the
training function. The marker file makes it "once": the restarted worker group carries on.
No library signature carries these hooks; production runs never set the variable.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

ENV = "RAY_FT_TEST_FAULTS"


def from_environment() -> dict | None:
    raw = os.environ.get(ENV)
    return json.loads(raw) if raw else None


def maybe_fail(spec: dict | None, step: int, rank: int) -> None:
    """Fail as `spec` says when this is its step and rank and it has not failed yet.

    Before a SIGKILL it waits a few seconds: Ray Train's controller collects reports at its
    health-check poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s), so a checkpoint reported less than
    one poll before a crash is not registered yet and the restart would use the one before it
    (correct, but the test could not say which step it resumed from)."""
    if not spec or step != spec["after_step"] or rank != spec.get("rank", 0):
        return
    marker = Path(spec["marker"])
    if marker.exists():
        return
    if spec.get("how", "sigkill") == "raise":
        marker.write_text(f"failed rank {rank} after step {step}")
        raise RuntimeError(f"injected failure after step {step}")
    time.sleep(5)
    marker.write_text(f"killed rank {rank} after step {step}")
    os.kill(os.getpid(), signal.SIGKILL)
