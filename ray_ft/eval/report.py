"""Summary table, Markdown report and PNG charts of an eval run.

Scores are shown as the seed recipe shows them: the sum over questions ("count") out of n, and
the percentage (for a 0/1 metric the sum is the number of questions that scored), with its 95%
bootstrap interval over questions; each model's gain over the base is bootstrapped paired, on
the same questions (`ray_ft.eval.intervals`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ray_ft.eval.intervals import bootstrap_ci, paired_difference_ci
from ray_ft.eval.scoring import RETRIEVAL_COLUMNS, SCORE_COLUMNS
from ray_ft.metrics.qa import percentile
from ray_ft.plots import write_png

JUDGE_COLUMNS: dict[str, str] = {
    "judge_relevance": "answer relevance (judge)",
    "judge_faithfulness": "faithfulness (judge)",
}
ALL_COLUMNS: dict[str, str] = {**SCORE_COLUMNS, **RETRIEVAL_COLUMNS, **JUDGE_COLUMNS}
# The gain over the base model is reported for these (paired bootstrap over the same questions).
GAIN_COLUMNS = ("cmrc_em", "cmrc_f1", "em", "origin")
BASE_LABEL = "base"


def summarize(rows: list[dict], wall_s: dict[tuple[str, str], float] | None = None,
              served_as: dict[str, str] | None = None) -> list[dict]:
    """One dict per (model, mode): n, the mean of every score and retrieval column present (None
    where absent, e.g. retrieval columns in gold mode) with its 95% interval (`<col>_ci95`),
    judge means over the judged rows (+ `<col>_n` judged, `<col>_failed` malformed), latency
    p50/p95, with `wall_s` (the time each group's requests took) requests per second, with
    `served_as` how the model was served, and for models other than the base their paired gain
    over it on the same questions (`gain_vs_base`: {col: [diff, lo, hi]})."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["mode"]), []).append(r)
    table = []
    for (model, mode), rs in groups.items():
        t = {"model": model, "mode": mode, "n": len(rs), "rejected": sum("error" in r for r in rs)}
        if served_as and model in served_as:
            t["served_as"] = served_as[model]
        for col in (*SCORE_COLUMNS, *RETRIEVAL_COLUMNS):
            t[col] = float(np.mean([r[col] for r in rs])) if col in rs[0] else None
            if t[col] is not None:
                t[f"{col}_ci95"] = list(bootstrap_ci([r[col] for r in rs]))
        base = groups.get((BASE_LABEL, mode))
        if model != BASE_LABEL and base is not None:
            t["gain_vs_base"] = _gains(rs, base)
        for col in JUDGE_COLUMNS:
            judged = [r for r in rs if col in r]
            if judged:
                ok = [r[col] for r in judged if r[col] is not None]
                t[col] = float(np.mean(ok)) if ok else None
                t[f"{col}_n"], t[f"{col}_failed"] = len(ok), len(judged) - len(ok)
        lat = [r["latency_s"] for r in rs]
        t["latency_p50_s"], t["latency_p95_s"] = percentile(lat, 50), percentile(lat, 95)
        t["throughput_rps"] = len(rs) / wall_s[(model, mode)] if wall_s else None
        table.append(t)
    return sorted(table, key=lambda t: (t["mode"], t["model"]))


def _gains(rows: list[dict], base: list[dict]) -> dict[str, list[float]]:
    """{col: [mean difference, lower, upper]} over the questions both answered."""
    theirs = {r["id"]: r for r in base}
    both = [(r, theirs[r["id"]]) for r in rows if r["id"] in theirs]
    if not both:
        return {}
    return {col: list(paired_difference_ci([r[col] for r, _ in both], [b[col] for _, b in both]))
            for col in GAIN_COLUMNS if col in both[0][0] and col in both[0][1]}


def format_cell(t: dict, col: str) -> str:
    mean = t.get(col)
    if mean is None:
        return "—"
    n = t.get(f"{col}_n", t["n"])
    count = mean * n
    count_s = f"{count:.0f}" if abs(count - round(count)) < 1e-9 else f"{count:.1f}"
    failed = t.get(f"{col}_failed")
    ci = t.get(f"{col}_ci95")
    pct = f"{100 * mean:.1f}%" + (f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
    return f"{count_s}/{n} ({pct})" + (f", {failed} unparsed" if failed else "")


def to_markdown(table: list[dict], images: list[str] | None = None, notes: list[str] | None = None) -> str:
    """Per mode: metrics as rows, models as columns (count/n (percent [95% interval])), the gain
    of each model over the base; then how each model was served, latency/throughput, `notes`
    and the images."""
    out = []
    for mode in sorted({t["mode"] for t in table}):
        ts = [t for t in table if t["mode"] == mode]
        cols = [c for c in ALL_COLUMNS if any(t.get(c) is not None for t in ts)]
        out.append(f"### {mode} context (n = {ts[0]['n']})\n")
        out.append("| metric | " + " | ".join(t["model"] for t in ts) + " |")
        out.append("|---|" + "---:|" * len(ts))
        out.extend(f"| {ALL_COLUMNS[c]} | " + " | ".join(format_cell(t, c) for t in ts) + " |" for c in cols)
        out.append("")
        gains = [t for t in ts if t.get("gain_vs_base")]
        if gains:
            out.append(f"Gain over base, {mode} context (percentage points, paired 95% bootstrap interval "
                       "over the same questions):\n")
            out.append("| model | " + " | ".join(SCORE_COLUMNS[c] for c in gains[0]["gain_vs_base"]) + " |")
            out.append("|---|" + "---:|" * len(gains[0]["gain_vs_base"]))
            for t in gains:
                out.append(f"| {t['model']} | " + " | ".join(
                    f"{100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]" for d, lo, hi in t["gain_vs_base"].values()) + " |")
            out.append("")
    served = {t["model"]: t["served_as"] for t in table if t.get("served_as")}
    if served:
        out.append("Served: " + "; ".join(f"{m}: {how}" for m, how in served.items()) + ".\n")
    out.append("| model | mode | n | refused (scored 0) | p50 latency (s) | p95 latency (s) | req/s |")
    out.append("|---|---|---:|---:|---:|---:|---:|")
    for t in table:
        rps = "—" if t.get("throughput_rps") is None else f"{t['throughput_rps']:.2f}"
        out.append(f"| {t['model']} | {t['mode']} | {t['n']} | {t.get('rejected', 0)} | {t['latency_p50_s']:.2f} | "
                   f"{t['latency_p95_s']:.2f} | {rps} |")
    out.append("")
    out.extend(f"{line}\n" for line in notes or [])
    out.extend(f"![{Path(p).stem}]({p})\n" for p in images or [])
    return "\n".join(out)


def plot_metrics(table: list[dict], path: Path) -> Path:
    """Grouped bar chart: one panel per mode, metrics on x, one bar per model (percent)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({t["mode"] for t in table})
    widest = max(len([c for c in ALL_COLUMNS if all(t.get(c) is not None for t in table if t["mode"] == m)])
                 * len([t for t in table if t["mode"] == m]) for m in modes)
    # Width grows with the bars so labels never overlap: ~0.32 inch per bar, labels slanted.
    fig, axes = plt.subplots(1, len(modes), figsize=(max(6.0, 1.5 + 0.32 * widest) * len(modes), 4.6), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        ts = [t for t in table if t["mode"] == mode]
        cols = [c for c in ALL_COLUMNS if all(t.get(c) is not None for t in ts)]
        x = np.arange(len(cols))
        width = 0.8 / len(ts)
        for i, t in enumerate(ts):
            vals = [100 * t[c] for c in cols]
            bars = ax.bar(x + (i - (len(ts) - 1) / 2) * width, vals, width, label=t["model"])
            ax.bar_label(bars, fmt="%.0f", fontsize=6, padding=1)
        ax.set_xticks(x, [ALL_COLUMNS[c] for c in cols], fontsize=8, rotation=35, ha="right",
                      rotation_mode="anchor")
        ax.set_ylim(0, 112)
        ax.set_ylabel("score (%)")
        ax.set_title(f"{mode} context, n = {ts[0]['n']}")
        # Above the axes, not over the bars.
        ax.legend(fontsize=8, ncol=min(len(ts), 4), loc="lower center", bbox_to_anchor=(0.5, 1.08), frameon=False)
    fig.tight_layout()
    return write_png(fig, path)
