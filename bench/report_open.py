"""eval/report.html in headless Chromium: how long a report of N questions takes to open, and a
screenshot of a real run's report.

Opens a report of N synthetic questions (2 models x 2 modes, top-3 retrieved passages each; the
rows `run_eval` writes, from tests/eval/fakes.py) `--repeat` times in a fresh page and prints the
time from navigation to the question browser's first page being drawn (median and max), the
file size and the time a filter change takes. With `--report PATH` it also writes screenshots of
that report: its first screen to `--screenshot`, the question browser filtered to the questions
the fine-tuned model gets right and the base does not to `..._browser.png`.

    .venv/bin/python bench/report_open.py --questions 1000 --report runs/cmrc_lora_smoke/eval/report.html \
        --screenshot bench/report_screenshot.png
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ray_ft.eval.html_report import write_html_report  # noqa: E402
from ray_ft.eval.report import summarize  # noqa: E402
from tests.eval.fakes import eval_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--report", type=Path, help="a real run's eval/report.html to screenshot")
    ap.add_argument("--screenshot", type=Path, default=Path("bench/report_screenshot.png"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(tempfile.mkdtemp())
    rows = eval_rows(args.questions)
    page_file = write_html_report(out, summarize(rows), rows, [])
    print(f"report of {args.questions} questions: {page_file.stat().st_size / 1e6:.2f} MB")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        opened, filtered = [], []
        for _ in range(args.repeat):
            page = browser.new_page()
            t = time.perf_counter()
            page.goto(page_file.as_uri())
            page.wait_for_selector("body[data-ready='1']")
            opened.append(time.perf_counter() - t)
            t = time.perf_counter()
            page.select_option("#f-outcome", "beats")
            page.wait_for_function("document.getElementById('count').textContent.indexOf(' of ') > 0")
            filtered.append(time.perf_counter() - t)
            page.close()
        print(f"open to first page drawn: median {1000 * statistics.median(opened):.0f} ms, max {1000 * max(opened):.0f} ms "
              f"({args.repeat} opens); filter change: median {1000 * statistics.median(filtered):.0f} ms")
        if args.report:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(args.report.resolve().as_uri())
            page.wait_for_selector("body[data-ready='1']")
            page.screenshot(path=str(args.screenshot))  # the first screen: tables, plots start
            # The question browser, showing where the fine-tuned model beats the base.
            page.select_option("#f-outcome", "beats")
            page.locator("#filters").scroll_into_view_if_needed()
            page.evaluate("document.getElementById('filters').scrollIntoView()")
            browser_shot = args.screenshot.with_name(args.screenshot.stem + "_browser.png")
            page.screenshot(path=str(browser_shot))
            print(f"screenshots: {args.screenshot}, {browser_shot}")
        browser.close()
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
