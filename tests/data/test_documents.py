"""Document readers on real files: a multi-page PDF written with fpdf2, the shipped HTML page with
navigation/script noise, Markdown with headings, text; the files that cannot be read."""

from __future__ import annotations

import io
import shutil

import pytest

from ray_ft.config import NodeGroupConfig
from ray_ft.data.documents import list_documents, parse_document, read_documents
from ray_ft.data.nodes import document_nodes
from ray_ft.errors import RayFTError
from tests.conftest import ROOT
from tests.data.pdfs import pages_of, write_pdf

CORPUS = ROOT / "jobs" / "documents"


def parse(path):
    return parse_document(str(path), path.name, path.read_bytes())


def words(text: str) -> str:
    return " ".join(text.split())


def test_pdf_sections_are_its_pages_with_their_numbers(tmp_path):
    pages = ["The lighthouse at Gull Rock was lit in 1872.", "Its lens came from a workshop in Paris.",
             "The keeper's cottage is now a small museum."]
    doc = parse(write_pdf(tmp_path / "light.pdf", pages))
    assert doc.kind == "pdf"
    assert [s.page for s in doc.sections] == [1, 2, 3]
    assert [words(s.text) for s in doc.sections] == pages
    # offsets place each page in the document's text (pages joined by a blank line)
    assert [s.start for s in doc.sections] == [0, len(pages[0]) + 2, len(pages[0]) + len(pages[1]) + 4]


def test_shipped_pdf_holds_the_text_it_was_written_from():
    doc = parse(CORPUS / "passenger_handbook.pdf")
    want = pages_of(ROOT / "bench" / "docs_corpus" / "passenger_handbook.txt")
    assert len(doc.sections) == len(want) == 4
    assert [words(s.text) for s in doc.sections] == [words(p) for p in want]


def test_html_keeps_the_article_and_drops_scripts_styles_and_page_furniture():
    doc = parse(CORPUS / "service_updates.html")
    text = "\n".join(s.text for s in doc.sections)
    for noise in ("dataLayer", "font-family", "Book now", "Contact us", "newsletter", "Cookie settings",
                  "travelling with pets", "Related"):
        assert noise not in text, noise
    assert [s.heading for s in doc.sections] == [
        "Service updates", "Service updates > Winter timetable", "Service updates > Dry dock for the Marren",
        "Service updates > New fares", "Service updates > Accessibility works"]
    fares = doc.sections[3].text
    assert "a single adult ticket on the Varne Sound crossing costs 7.20 pounds" in words(fares)


def test_markdown_sections_carry_their_heading_path(tmp_path):
    md = tmp_path / "guide.md"
    md.write_text("Intro before any heading.\n\n# Guide\n\nTop *level* text with a [link](http://x).\n\n"
                  "## Install\n\nRun the installer.\n\n```sh\n# not a heading\npip install x\n```\n\n"
                  "Usage\n-----\n\nSetext heading body.\n\n### Flags\n\nUse `--fast`.\n\n# Other\n\nLast.\n")
    doc = parse(md)
    assert [(s.heading, s.text) for s in doc.sections] == [
        (None, "Intro before any heading."),
        ("Guide", "Top level text with a link."),
        ("Guide > Install", "Run the installer.\n# not a heading\npip install x"),
        ("Guide > Usage", "Setext heading body."),
        ("Guide > Usage > Flags", "Use --fast."),
        ("Other", "Last."),
    ]


def test_text_file_is_one_section():
    doc = parse(CORPUS / "history.txt")
    assert doc.kind == "text" and len(doc.sections) == 1
    assert doc.sections[0].text.startswith("A short history of the Orla Ferry Company")


def test_node_ids_are_stable_and_do_not_depend_on_where_the_corpus_sits(tmp_path):
    group = NodeGroupConfig(kind="chunk", chunk_size=300, chunk_overlap=40)

    def node_ids(folder):
        return [n["node_id"] for s, name in list_documents([str(folder)])
                for n in document_nodes(parse_document(s, name, open(s, "rb").read()), group)]

    a, b = tmp_path / "a" / "docs", tmp_path / "b" / "elsewhere"
    shutil.copytree(CORPUS, a)
    shutil.copytree(CORPUS, b)
    ids = node_ids(a)
    assert ids == node_ids(a) == node_ids(b)
    assert len(set(ids)) == len(ids) > 20
    nodes = document_nodes(parse(CORPUS / "passenger_handbook.pdf"), group)
    assert {n["metadata"]["page"] for n in nodes} == {1, 2, 3, 4}
    assert all(n["metadata"]["document"] == "passenger_handbook.pdf" for n in nodes)
    md_nodes = document_nodes(parse(CORPUS / "crew_guide.md"), group)
    assert "Orla Ferry Company crew guide > At sea > Weather limits" in {n["metadata"]["heading"] for n in md_nodes}


def _encrypted_pdf(path):
    from pypdf import PdfReader, PdfWriter

    plain = io.BytesIO(write_pdf(path, ["Secret page."]).read_bytes())
    writer = PdfWriter()
    for page in PdfReader(plain).pages:
        writer.add_page(page)
    writer.encrypt("secret", algorithm="AES-256")
    with path.open("wb") as f:
        writer.write(f)
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: _encrypted_pdf(p / "locked.pdf"), "encrypted PDF: a password is needed to read it"),
    (lambda p: (p / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog /Pages 9 0 R >>\n%%EOF")
     and p / "broken.pdf", "corrupt PDF"),
    (lambda p: (p / "fake.pdf").write_bytes(b"PK\x03\x04 a zip file") and p / "fake.pdf",
     "not a PDF file (no %PDF header)"),
    (lambda p: (p / "data.txt").write_bytes(b"abc\x00\x01\x02\xff") and p / "data.txt", "binary data, not text"),
    (lambda p: (p / "empty.md").write_text("   \n") and p / "empty.md", "file is empty"),
    (lambda p: (p / "title.md").write_text("# Only a title\n") and p / "title.md", "no text in this markdown file"),
])
def test_unreadable_files_are_one_line_errors_naming_the_file(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(RayFTError) as err:
        parse(path)
    text = str(err.value)
    assert text.startswith(str(path)) and message in text and "\n" not in text


def test_missing_paths_and_empty_folders_are_errors():
    with pytest.raises(RayFTError, match=r"^/nowhere/report\.pdf: file not found$"):
        list_documents(["/nowhere/report.pdf"])
    with pytest.raises(RayFTError, match="no document files match"):
        list_documents([str(CORPUS / "*.docx")])


def test_read_on_ray_data_stops_on_a_bad_file_or_skips_and_counts_it(tmp_path, ray_cluster):
    shutil.copytree(CORPUS, tmp_path / "docs")
    _encrypted_pdf(tmp_path / "docs" / "locked.pdf")
    (tmp_path / "docs" / "notes.txt").write_bytes(b"\x00\x00binary")
    with pytest.raises(RayFTError, match=r"locked\.pdf: encrypted PDF"):
        read_documents([str(tmp_path / "docs")])
    docs, report = read_documents([str(tmp_path / "docs")], on_error="skip")
    assert [d.name for d in docs] == ["crew_guide.md", "history.txt", "passenger_handbook.pdf", "service_updates.html"]
    assert (report.files, report.read, report.skipped) == (6, 4, 2)
    assert report.by_kind == {"markdown": 1, "text": 1, "pdf": 1, "html": 1}
    assert any("locked.pdf: encrypted PDF" in e for e in report.skipped_examples)
    assert any("notes.txt: binary data" in e for e in report.skipped_examples)
