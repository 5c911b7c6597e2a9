"""eval/report.html: the summary tables, the plots and a question browser in one self-contained
file (inline CSS and script, plots as embedded PNGs, the answers as embedded JSON: it opens from
disk or an MLflow artifact view with no network).

The tables are written here, so their numbers are in the page before any script runs; the
browser (`report_assets/report.js`) renders one page of questions at a time from the data.
"""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from ray_ft.eval.report import ALL_COLUMNS, BASE_LABEL, SCORE_COLUMNS, format_cell
from ray_ft.io import write_text_atomic

ASSETS = Path(__file__).with_name("report_assets")
TITLE = "ray_ft evaluation"


def _models_in_order(rows: list[dict]) -> list[str]:
    seen = list(dict.fromkeys(r["model"] for r in rows))
    return sorted(seen, key=lambda m: (m != BASE_LABEL, seen.index(m)))


class _Texts:
    """Passages interned once: a CMRC passage has several questions, and every model retrieves it."""

    def __init__(self):
        self.index: dict[str, int] = {}

    def __call__(self, text: str) -> int:
        return self.index.setdefault(text, len(self.index))

    def list(self) -> list[str]:
        return list(self.index)


def browser_data(rows: list[dict]) -> dict:
    """The question browser's data: per question its passage, each (mode, model) answer with its
    scores, the passages retrieved per mode (with score, node id and whether it is the gold one)."""
    metrics = [c for c in ALL_COLUMNS if any(r.get(c) is not None for r in rows)]
    texts, questions = _Texts(), {}
    for r in rows:
        q = questions.setdefault(r["id"], {"id": r["id"], "q": r["question"], "refs": r["references"],
                                           "pid": r.get("gold_passage_id"), "p": None, "by": {}, "r": {}})
        passage = r.get("gold_context") or (r["context"] if r["mode"] == "gold" else None)
        if passage and q["p"] is None:
            q["p"] = texts(passage)
        answer = {"a": r["prediction"], "s": {c: r[c] for c in metrics if r.get(c) is not None}}
        if "error" in r:
            answer["err"] = r["error"]
        q["by"].setdefault(r["mode"], {})[r["model"]] = answer
        if "retrieved_texts" in r and r["mode"] not in q["r"]:  # one retriever serves every model
            ids = r["retrieved_ids"] if len(r["retrieved_ids"]) == len(r["retrieved_texts"]) else [None] * len(r["retrieved_texts"])
            q["r"][r["mode"]] = [[texts(t), s, i, bool(i) and i.split(":")[0] == q["pid"]]
                                 for t, s, i in zip(r["retrieved_texts"], r["retrieved_scores"], ids)]
    return {"models": _models_in_order(rows), "modes": list(dict.fromkeys(r["mode"] for r in rows)),
            "metrics": metrics, "metric_names": {c: ALL_COLUMNS[c] for c in metrics},
            "texts": texts.list(), "questions": list(questions.values())}


def _tables(table: list[dict]) -> str:
    out = []
    for mode in sorted({t["mode"] for t in table}):
        ts = [t for t in table if t["mode"] == mode]
        cols = [c for c in ALL_COLUMNS if any(t.get(c) is not None for t in ts)]
        out.append(f'<h3>{html.escape(mode)} context (n = {ts[0]["n"]})</h3><table class="summary" data-mode="{html.escape(mode)}">')
        out.append("<tr><th>metric</th>" + "".join(f'<th class="num">{html.escape(t["model"])}</th>' for t in ts) + "</tr>")
        for c in cols:
            cells = "".join(
                f'<td class="num" data-model="{html.escape(t["model"])}" data-metric="{c}" '
                f'data-value="{"" if t.get(c) is None else repr(t[c])}">{html.escape(format_cell(t, c))}</td>' for t in ts)
            out.append(f"<tr><th>{html.escape(ALL_COLUMNS[c])}</th>{cells}</tr>")
        out.append("</table>")
        gains = [t for t in ts if t.get("gain_vs_base")]
        if gains:
            keys = list(gains[0]["gain_vs_base"])
            out.append(f"<p>Gain over base, {html.escape(mode)} context (percentage points, paired 95% bootstrap "
                       "interval over the same questions):</p><table class=\"gains\">")
            out.append("<tr><th>model</th>" + "".join(f'<th class="num">{html.escape(SCORE_COLUMNS[k])}</th>' for k in keys) + "</tr>")
            for t in gains:
                out.append(f"<tr><th>{html.escape(t['model'])}</th>" + "".join(
                    f'<td class="num">{100 * d:+.1f} <span class="ci">[{100 * lo:+.1f}, {100 * hi:+.1f}]</span></td>'
                    for d, lo, hi in (t["gain_vs_base"][k] for k in keys)) + "</tr>")
            out.append("</table>")
    out.append("<h3>Latency and throughput</h3><table><tr><th>model</th><th>mode</th><th class=\"num\">n</th>"
               "<th class=\"num\">refused</th><th class=\"num\">p50 (s)</th><th class=\"num\">p95 (s)</th>"
               "<th class=\"num\">req/s</th></tr>")
    for t in table:
        rps = "—" if t.get("throughput_rps") is None else f"{t['throughput_rps']:.2f}"
        out.append(f"<tr><td>{html.escape(t['model'])}</td><td>{html.escape(t['mode'])}</td><td class=\"num\">{t['n']}</td>"
                   f"<td class=\"num\">{t.get('rejected', 0)}</td><td class=\"num\">{t['latency_p50_s']:.2f}</td>"
                   f"<td class=\"num\">{t['latency_p95_s']:.2f}</td><td class=\"num\">{rps}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _notes(notes: list[str]) -> str:
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    return "".join(md.render(n) for n in notes)


def _plots(images: list[Path]) -> str:
    return "".join(f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
                   f'{base64.b64encode(p.read_bytes()).decode()}"></figure>' for p in images if p.is_file())


def _json_for_script(data: dict) -> str:
    # "</" would end the script element early; "<\/" is the same string to JSON.parse.
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("</", "<\\/")


FILTERS = """<div id="filters">
<label>mode <select id="f-mode"></select></label>
<label><select id="f-a"></select> vs <select id="f-b"></select></label>
<label>by <select id="f-metric"></select></label>
<label>show <select id="f-outcome"><option value="all">all questions</option><option value="beats">first beats second</option>
<option value="loses">first loses to second</option><option value="both_wrong">both wrong</option>
<option value="both_right">both right</option></select></label>
<label>right at ≥ <input id="f-right" type="number" step="0.05" min="0" max="1"></label>
<label>first's score from <input id="f-min" type="number" step="0.05"> to <input id="f-max" type="number" step="0.05"></label>
<label><input id="f-q" type="search" placeholder="search questions, answers, passages"></label>
<span class="pager"><button id="prev">‹ prev</button><button id="next">next ›</button></span>
</div><p id="count"></p><div id="questions"></div>"""


def write_html_report(out_dir: Path, table: list[dict], rows: list[dict], images: list[Path],
                      notes: list[str] | None = None, title: str = TITLE) -> Path:
    """Write out_dir/report.html (temp file, then rename)."""
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{(ASSETS / "report.css").read_text()}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="meta">{len({r["id"] for r in rows})} questions · models {html.escape(", ".join(_models_in_order(rows)))} ·
modes {html.escape(", ".join(dict.fromkeys(r["mode"] for r in rows)))} · each cell: count/n (percent [95% bootstrap interval])</p>
<h2>Results</h2>{_tables(table)}
<div class="notes">{_notes(notes or [])}</div>
<h2>Plots</h2><div class="plots">{_plots(images)}</div>
<h2>Questions</h2>{FILTERS}
<script id="report-data" type="application/json">{_json_for_script(browser_data(rows))}</script>
<script>{(ASSETS / "report.js").read_text()}</script>
</body></html>
"""
    path = out_dir / "report.html"
    write_text_atomic(path, page)
    return path
