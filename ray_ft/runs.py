"""Finished runs side by side: `ray-ft runs [OUTPUT_DIR]` lists the run folders, `ray-ft compare
RUN_DIR…` compares two or more of them (Markdown, and the same as a self-contained HTML page).

Everything is read from what the runs wrote: `config.resolved.yaml`, `stages.json`,
`eval/summary.json` and `eval/predictions.jsonl`; nothing is recomputed by serving.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from ray_ft.config import RESOLVED_FILE
from ray_ft.errors import RayFTError
from ray_ft.io import read_jsonl, write_text_atomic
from ray_ft.stages import STAGES, STATE_FILE
from ray_ft.tracking import flatten

HEADLINE = ("cmrc_f1", "em", "context_hit")  # the metrics a run's one line shows, where present


@dataclass
class RunInfo:
    path: Path
    name: str
    config: dict = field(default_factory=dict)
    stages: dict = field(default_factory=dict)
    table: list[dict] = field(default_factory=list)

    @property
    def date(self) -> str:
        files = [self.path / f for f in (STATE_FILE, RESOLVED_FILE) if (self.path / f).is_file()]
        return time.strftime("%Y-%m-%d %H:%M", time.localtime(max(f.stat().st_mtime for f in files))) if files else "—"

    def headline(self) -> str:
        """Each model's first headline metric in its first mode, e.g. `gold: base 12.0%, finetuned 40.0%`."""
        if not self.table:
            return "—"
        mode = sorted({t["mode"] for t in self.table})[0]
        ts = [t for t in self.table if t["mode"] == mode]
        col = next((c for c in HEADLINE if all(t.get(c) is not None for t in ts)), None)
        if col is None:
            return "—"
        return f"{mode} {col}: " + ", ".join(f"{t['model']} {100 * t[col]:.1f}%" for t in ts)


def read_run(path: Path) -> RunInfo:
    """A run folder's record; a folder with neither a resolved config nor stages.json is not a run."""
    path = Path(path)
    cfg_file, stages_file = path / RESOLVED_FILE, path / STATE_FILE
    if not cfg_file.is_file() and not stages_file.is_file():
        raise RayFTError(f"{path}: not a run folder (no config.resolved.yaml or stages.json)")
    info = RunInfo(path, path.name)
    try:
        if cfg_file.is_file():
            info.config = yaml.safe_load(cfg_file.read_text(encoding="utf-8")) or {}
        if stages_file.is_file():
            info.stages = json.loads(stages_file.read_text())
        summary = path / "eval" / "summary.json"
        if summary.is_file():
            info.table = json.loads(summary.read_text())
    except (ValueError, yaml.YAMLError) as err:
        raise RayFTError(f"{path}: unreadable run record: {err}") from None
    return info


def list_runs(output_dir: Path) -> list[RunInfo]:
    if not Path(output_dir).is_dir():
        raise RayFTError(f"{output_dir}: no such folder")
    runs = []
    for sub in sorted(p for p in Path(output_dir).iterdir() if p.is_dir()):
        try:
            runs.append(read_run(sub))
        except RayFTError:
            continue  # mlartifacts/ and other folders beside the runs
    return runs


def runs_markdown(runs: list[RunInfo]) -> str:
    out = ["| run | task | model | data | date | stages done | headline |", "|---|---|---|---|---|---|---|"]
    for r in runs:
        c = r.config
        data = (c.get("data") or {}).get("source", "—") if c else "—"
        done = ", ".join(s for s in STAGES if s in r.stages) or "none"
        out.append(f"| {r.name} | {c.get('task', '—')} | {(c.get('model') or {}).get('name', '—')} | "
                   f"{Path(str(data)).name} | {r.date} | {done} | {r.headline()} |")
    return "\n".join(out) + "\n"


def _common_scores(runs: list[RunInfo]) -> tuple[list[str], dict]:
    """The questions every run answered (by id) and, per (mode, model, run), the mean of each
    metric over them: the same questions, so the numbers compare."""
    preds = []
    for r in runs:
        f = r.path / "eval" / "predictions.jsonl"
        preds.append(read_jsonl(f) if f.is_file() else [])
    ids = set.intersection(*({p["id"] for p in rows} for rows in preds)) if all(preds) else set()
    means: dict = {}
    for k, rows in enumerate(preds):
        groups: dict = {}
        for p in rows:
            if p["id"] in ids:
                groups.setdefault((p["mode"], p["model"]), []).append(p)
        for key, ps in groups.items():
            means.setdefault(key, {})[k] = {c: float(np.mean([p[c] for p in ps])) for c in HEADLINE + ("cosine",)
                                            if all(p.get(c) is not None for p in ps)} | {"n": len(ps)}
    return sorted(ids), means


def config_differences(runs: list[RunInfo]) -> list[tuple[str, list[str]]]:
    """(dotted key, each run's value) where the resolved configs differ; `name` and `output_dir` aside."""
    flat = [flatten(r.config) for r in runs]
    keys = sorted(set().union(*flat) - {"name", "output_dir"})
    return [(k, [f.get(k, "(absent)") for f in flat]) for k in keys if len({f.get(k, "(absent)") for f in flat}) > 1]


def compare_markdown(runs: list[RunInfo]) -> str:
    if len(runs) < 2:
        raise RayFTError("ray-ft compare: give two or more run folders")
    names = [r.name for r in runs]
    out = ["## Runs\n", runs_markdown(runs)]
    ids, means = _common_scores(runs)
    out.append(f"## Scores on the questions every run answered (n = {len(ids)})\n")
    if means:
        out.append("| mode | model | metric | " + " | ".join(names) + " |")
        out.append("|---|---|---|" + "---:|" * len(runs))
        for (mode, model), per_run in sorted(means.items()):
            cols = sorted(set.intersection(*(set(v) for v in per_run.values())) - {"n"}) if per_run else []
            for c in cols:
                cells = [f"{100 * per_run[k][c]:.1f}%" if k in per_run else "—" for k in range(len(runs))]
                out.append(f"| {mode} | {model} | {c} | " + " | ".join(cells) + " |")
        out.append("")
    else:
        out.append("No questions in common (or a run has no eval/predictions.jsonl).\n")
    diffs = config_differences(runs)
    out.append("## Config differences\n")
    if diffs:
        out.append("| key | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(runs))
        out.extend(f"| `{k}` | " + " | ".join(f"`{v}`" for v in vals) + " |" for k, vals in diffs)
    else:
        out.append("The resolved configs are the same (apart from name and output_dir).")
    return "\n".join(out) + "\n"


def write_comparison(runs: list[RunInfo], out: Path) -> tuple[Path, Path]:
    """out.md and out.html (the Markdown rendered, one self-contained page)."""
    import html as html_lib

    from markdown_it import MarkdownIt

    md = compare_markdown(runs)
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(md)
    title = "ray_ft: " + " vs ".join(html_lib.escape(r.name) for r in runs)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>body{{font:14px system-ui,"
            "sans-serif;max-width:1200px;margin:auto;padding:16px}}table{{border-collapse:collapse}}td,th{{border-bottom:"
            f"1px solid #ddd;padding:3px 8px;text-align:left}}</style></head><body><h1>{title}</h1>{body}</body></html>\n")
    md_path, html_path = out.with_suffix(".md"), out.with_suffix(".html")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(md_path, md)
    write_text_atomic(html_path, page)
    return md_path, html_path
