"""eval/report.html: self-contained, its tables match summary.json, and in a real browser (Debian's
headless chromium driven by Playwright) it runs without console errors and its filters and search
show the questions they should."""

import json
import re
import shutil

import pytest

from ray_ft.eval.html_report import browser_data, write_html_report
from ray_ft.eval.report import format_cell, plot_metrics, summarize
from tests.eval.fakes import eval_rows

CHROMIUM = shutil.which("chromium")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    rows = eval_rows(1000)
    rows[0]["prediction"] = "</script><b>not markup</b>"  # a model's answer is text, never markup
    table = summarize(rows)
    (out / "summary.json").write_text(json.dumps(table))
    plot = plot_metrics(table, out / "metrics.png")
    path = write_html_report(out, table, rows, [plot, out / "absent.png"], ["| step | EM |\n|---|---|\n| 3 | 50% |"])
    return path, rows, table


def test_the_page_needs_no_network_and_holds_the_data_once(report):
    path, rows, _ = report
    page = path.read_text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # no CDN, no remote fonts
    assert page.count("data:image/png;base64,") == 1  # the plot that exists, embedded
    assert "<b>not markup</b>" not in page
    data = browser_data(rows)
    assert len(data["questions"]) == 1000 and data["models"] == ["base", "finetuned"]
    assert len(data["texts"]) == 250  # each passage once, for 4 questions x 2 models x 2 modes
    q = data["questions"][1]
    assert data["texts"][q["p"]].endswith("ans0x.") and [r[3] for r in q["r"]["retrieved"]] == [True, False, False]
    assert q["by"]["gold"]["finetuned"]["s"]["em"] == next(
        r["em"] for r in rows if (r["id"], r["model"], r["mode"]) == (q["id"], "finetuned", "gold"))


def _expected(rows, mode, keep):
    by = {}
    for r in rows:
        if r["mode"] == mode:
            by.setdefault(r["id"], {})[r["model"]] = r
    return [i for i, m in by.items() if keep(m)]


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/setup does as root)")
def test_in_chromium_the_tables_filters_and_search_work(report):
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright package (test extra)")
    path, rows, table = report
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto(path.as_uri())
        page.wait_for_selector("body[data-ready='1']")

        # The tables: every cell's number is summary.json's, shown as the Markdown report shows it.
        cells = page.eval_on_selector_all("table.summary td", "tds => tds.map(td => [td.closest('table').dataset.mode, "
                                          "td.dataset.model, td.dataset.metric, td.dataset.value, td.textContent])")
        want = {(t["mode"], t["model"]): t for t in table}
        assert len(cells) == sum(sum(t.get(c) is not None for c in ("em", "cmrc_em", "cmrc_f1", "cosine", "origin", "origin_char",
                                                                       "context_hit", "recall_at_k", "mrr_at_k")) for t in table)
        for mode, model, metric, value, text in cells:
            t = want[(mode, model)]
            assert float(value) == pytest.approx(t[metric]) and text == format_cell(t, metric)
        assert "1000 of 1000 questions · page 1 of 40" in page.text_content("#count")

        def shown():
            return page.eval_on_selector_all("article.q", "as => as.map(a => a.dataset.id)")

        # Where the fine-tuned model beats the base (EM, gold passage).
        page.select_option("#f-outcome", "beats")
        beats = _expected(rows, "gold", lambda m: m["finetuned"]["em"] > m["base"]["em"])
        assert page.text_content("#count").startswith(f"{len(beats)} of 1000 questions")
        assert shown() == beats[:25] and 0 < len(beats) < 1000
        # ... in retrieved mode, both wrong by CMRC F1 at 0.5
        page.select_option("#f-mode", "retrieved")
        page.select_option("#f-metric", "cmrc_f1")
        page.select_option("#f-outcome", "both_wrong")
        both = _expected(rows, "retrieved", lambda m: m["finetuned"]["cmrc_f1"] < 0.5 and m["base"]["cmrc_f1"] < 0.5)
        assert shown() == both[:25] and page.text_content("#count").startswith(f"{len(both)} of")
        # Search (question, references, own passage, answers): passage 7's answer token, all outcomes.
        page.select_option("#f-outcome", "all")
        page.fill("#f-q", "ANS7X")
        assert shown() == ["q00028", "q00029", "q00030", "q00031"]
        marked = page.eval_on_selector_all("article.q[data-id='q00028'] .passage mark.ref", "ms => ms.map(m => m.textContent)")
        assert marked == ["ans7x"]  # the reference span highlighted in its passage
        # The view is in the URL: reopening it shows the same questions; the next page turns.
        url = page.url
        assert "q=ANS7X" in url and "mode=retrieved" in url
        page.fill("#f-q", "")
        page.select_option("#f-outcome", "beats")
        page.select_option("#f-mode", "gold")
        page.select_option("#f-metric", "em")
        first = shown()
        page.click("#next")
        assert shown() == beats[25:50] and shown() != first
        page.goto(url)
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.input_value("#f-q") == "ANS7X" and shown() == ["q00028", "q00029", "q00030", "q00031"]
        page.select_option("#f-mode", "gold")
        page.fill("#f-q", "not markup")  # the answer that looks like markup is shown as text
        assert shown() == ["q00000"]
        assert page.text_content("article.q[data-id='q00000'] td.answer") == "</script><b>not markup</b>"
        browser.close()
    assert problems == []
