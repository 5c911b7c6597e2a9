"""The learning curve: dev-split answer metrics against training examples seen.

The points are the validations during training (`train.eval_every_n_steps`): greedy answers to
the first `train.val_generate_samples` dev questions, scored like the eval stage (exact match,
CMRC F1, origin), each with its standard error over those questions. The dev split is held out
of training and is not the eval set, so the curve can guide a choice (epochs, data size) without
touching the questions the report scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CURVE_METRICS = {"val_exact_match": "exact match (seed)", "val_f1": "F1 (CMRC)", "val_origin": "origin (seed, words)"}
Z95 = 1.96


def curve_points(history: list[dict]) -> list[dict]:
    """The validation rows of a training history, with `examples_seen` (the step where an older
    history lacks it)."""
    return [h for h in history if "val_f1" in h]


def _x(h: dict) -> int:
    return h.get("examples_seen", h["step"])


def to_markdown(history: list[dict]) -> str:
    """A table of the curve: step, examples seen, val loss, each metric as percent ± 95% half-width."""
    points = curve_points(history)
    if not points:
        return ""
    n = points[-1].get("val_questions")
    out = [f"Learning curve (dev split{f', {n} questions' if n else ''}; ± is the 95% interval, 1.96 x the "
           "standard error over the questions):\n",
           "| step | examples seen | val loss | " + " | ".join(CURVE_METRICS.values()) + " |",
           "|---:|---:|---:|" + "---:|" * len(CURVE_METRICS)]
    for h in points:
        cells = []
        for key in CURVE_METRICS:
            se = h.get(f"{key}_se")
            cells.append(f"{100 * h[key]:.1f}" + (f" ± {100 * Z95 * se:.1f}" if se is not None else ""))
        out.append(f"| {h['step']} | {_x(h)} | {h['val_loss']:.3f} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def plot_learning_curve(history: list[dict], path: Path) -> Path | None:
    """Dev metrics (percent, 95% error bars) against examples seen; None without validations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ray_ft.plots import write_png

    points = curve_points(history)
    if not points:
        return None
    x = np.array([_x(h) for h in points])
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in CURVE_METRICS.items():
        y = np.array([100 * h[key] for h in points])
        err = np.array([100 * Z95 * h.get(f"{key}_se", 0.0) for h in points])
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
    n = points[-1].get("val_questions")
    ax.set_xlabel("training examples seen" if "examples_seen" in points[0] else "optimizer step")
    ax.set_ylabel("dev score (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"learning curve, dev split{f' (n = {n} questions per point)' if n else ''}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return write_png(fig, path)
