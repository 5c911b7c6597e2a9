"""Real PDF files for the reader tests and the shipped corpus, written with fpdf2 (core Helvetica:
latin-1 text, which is all our corpus holds).

    python -m tests.data.pdfs bench/docs_corpus/passenger_handbook.txt jobs/documents/passenger_handbook.pdf

writes the shipped handbook: the text file's pages are separated by a line holding only \\f.
"""

from __future__ import annotations

import sys
from datetime import datetime, timezone
from pathlib import Path


def write_pdf(path: Path, pages: list[str]) -> Path:
    """One PDF page per item of `pages`; a fixed creation date so the bytes repeat."""
    from fpdf import FPDF

    pdf = FPDF(format="A4")
    pdf.set_creation_date(datetime(2026, 1, 1, tzinfo=timezone.utc))
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        for para in text.strip().split("\n\n"):
            pdf.multi_cell(0, 6, " ".join(para.split()), new_x="LMARGIN", new_y="NEXT")
            pdf.ln(3)
    Path(path).write_bytes(bytes(pdf.output()))
    return Path(path)


def pages_of(text_file: Path) -> list[str]:
    return [p.strip() for p in Path(text_file).read_text().split("\n\\f\n")]


if __name__ == "__main__":
    src, dst = sys.argv[1:3]
    write_pdf(Path(dst), pages_of(Path(src)))
    print(f"wrote {dst}")
