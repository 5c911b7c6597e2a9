"""PNG plots shared by training and evaluation, written atomically (temp file, then rename)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_png(fig, path: Path) -> Path:
    """Save next to `path` then rename, so a reader never sees half a PNG."""
    import matplotlib.pyplot as plt

    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def plot_loss(history: list[dict], path: Path, window: int = 8) -> Path:
    """Training loss per step, raw and as a trailing mean over `window` steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history], dtype=np.float64)
    smooth = np.array([loss[max(0, i - window + 1):i + 1].mean() for i in range(len(loss))])
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, loss, alpha=0.35, label="loss")
    ax.plot(steps, smooth, label=f"mean of last {window} steps")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.legend()
    return write_png(fig, path)
