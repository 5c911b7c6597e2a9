"""A real corpus nobody here wrote: Financial-QA-10k's 10-K passages joined into one text document
per company, for bench/finqa_docs/job.yaml (documents in, report out).

    .venv/bin/python bench/finqa_docs/make_documents.py [--tickers NKE WMT DAL AMD] [--out runs/finqa_documents]

Each company's distinct passages, in the CSV's order, one paragraph each, under a title line.
The dataset's own questions are not used: the job writes its own.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ray_ft.io import write_text_atomic

ROOT = Path(__file__).resolve().parents[2]
FINQA = ROOT.parent / "shared" / "datasets" / "financial-qa-10k" / "financial_qa_10k.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tickers", nargs="+", default=["NKE", "WMT", "DAL", "AMD"])
    ap.add_argument("--out", default=str(ROOT / "runs" / "finqa_documents"))
    args = ap.parse_args()
    # dict keys: distinct passages in first-seen order
    passages: dict[str, dict[str, None]] = {t: {} for t in args.tickers}
    with FINQA.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            text = " ".join((row["context"] or "").split())
            if row["ticker"] in passages and text:
                passages[row["ticker"]].setdefault(text)
    for ticker, texts in passages.items():
        path = Path(args.out) / f"{ticker}_10-K.txt"
        write_text_atomic(path, f"{ticker} annual report (Form 10-K) excerpts\n\n" + "\n\n".join(texts) + "\n")
        print(f"{path}: {len(texts)} passages, {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
