"""Switch on the library's test-only fault injection (`ray_ft.train.faults`) for one run."""

import json
from pathlib import Path

from ray_ft.train import faults


def fail_once(monkeypatch, marker: Path, after_step: int, rank: int = 0, how: str = "sigkill") -> None:
    """The next launched run fails once: worker `rank` dies (sigkill) or raises after `after_step`."""
    monkeypatch.setenv(faults.ENV, json.dumps({"after_step": after_step, "rank": rank, "how": how,
                                               "marker": str(marker)}))


def no_faults(monkeypatch) -> None:
    monkeypatch.delenv(faults.ENV, raising=False)
