"""Your own documents: PDF, HTML, Markdown and plain text -> `Document`s made of sections.

    data.documents: [files, folders, globs, s3://... URIs]
      -> list_documents (the files, each with a stable name)
      -> read_documents on Ray Data (one task per file: fetch the bytes, parse)
      -> Document(name, kind, sections: text + page (PDF) / heading path (Markdown, HTML))

A file that cannot be read (encrypted or corrupt PDF, binary data, no text, missing) is one line
naming it: an error, or with `data.on_error: skip` skipped and counted in the manifest.
"""

from __future__ import annotations

import glob
import io
import json
import logging
from dataclasses import asdict, dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from ray_ft.data.sources import KEPT_EXAMPLES, decode_text, is_uri, read_bytes
from ray_ft.errors import RayFTError

log = logging.getLogger(__name__)

KINDS = {".pdf": "pdf", ".html": "html", ".htm": "html", ".md": "markdown", ".markdown": "markdown",
         ".txt": "text"}


@dataclass(frozen=True)
class Section:
    """A run of a document's text with where it sits: its PDF page (1-based) or the path of
    headings above it ("Guide > Install"); `start` is its offset in the document's text."""

    text: str
    start: int
    page: int | None = None
    heading: str | None = None


@dataclass(frozen=True)
class Document:
    name: str  # the file's path relative to the folder it was listed from (its own name if listed alone)
    source: str  # where it was read from
    kind: str
    sections: tuple[Section, ...]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Document":
        return cls(d["name"], d["source"], d["kind"], tuple(Section(**s) for s in d["sections"]))


@dataclass
class DocumentReport:
    """What reading the documents found; it goes into the manifest."""

    files: int = 0
    read: int = 0
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    by_kind: dict[str, int] = field(default_factory=dict)
    characters: int = 0


# --- listing ---------------------------------------------------------------------------------

def _kind_of(path: str) -> str | None:
    return KINDS.get(Path(path.split("?", 1)[0]).suffix.lower())


def list_documents(entries: list[str]) -> list[tuple[str, str]]:
    """(source, name) of every document file: a folder gives its supported files (recursively,
    sorted), a glob its matches, a file or URI itself. Names are relative to the folder or glob
    root, so node ids do not depend on where the corpus sits on disk."""
    out: list[tuple[str, str]] = []
    for entry in entries:
        if is_uri(entry):
            out += _list_uri(entry)
        elif any(c in entry for c in "*?["):
            root = Path(entry.split("*")[0].split("?")[0].split("[")[0]).parent
            hits = sorted(p for p in glob.glob(entry, recursive=True) if Path(p).is_file() and _kind_of(p))
            if not hits:
                raise RayFTError(f"{entry}: no document files match this pattern ({', '.join(sorted(KINDS))})")
            out += [(p, Path(p).relative_to(root).as_posix()) for p in hits]
        elif Path(entry).is_dir():
            hits = sorted(p for p in Path(entry).rglob("*") if p.is_file() and _kind_of(str(p)))
            if not hits:
                raise RayFTError(f"{entry}: no document files in this folder ({', '.join(sorted(KINDS))})")
            out += [(str(p), p.relative_to(entry).as_posix()) for p in hits]
        elif Path(entry).is_file():
            if not _kind_of(entry):
                raise RayFTError(f"{entry}: unsupported document type (supported: {', '.join(sorted(KINDS))})")
            out.append((entry, Path(entry).name))
        else:
            raise RayFTError(f"{entry}: file not found")
    names = [n for _, n in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise RayFTError(f"data.documents: two files are both named {dupes[0]!r} relative to their folders; "
                         "node ids come from these names, so rename one")
    return out


def _list_uri(entry: str) -> list[tuple[str, str]]:
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(entry)
        info = fs.get_file_info(path)
    except Exception as err:  # bad scheme, no credentials: the message says which
        raise RayFTError(f"{entry}: cannot list ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    if info.type == pafs.FileType.NotFound:
        raise RayFTError(f"{entry}: file not found")
    if info.type == pafs.FileType.File:
        return [(entry, Path(path).name)]
    scheme = entry.split("://", 1)[0]
    files = sorted(f.path for f in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                   if f.type == pafs.FileType.File and _kind_of(f.path))
    if not files:
        raise RayFTError(f"{entry}: no document files under this prefix")
    return [(f"{scheme}://{f}", f[len(path.rstrip('/')) + 1:]) for f in files]


# --- parsing ---------------------------------------------------------------------------------

def parse_document(source: str, name: str, data: bytes) -> Document:
    """The sections of one file's bytes; RayFTError (naming `source`) when it has no usable text."""
    kind = _kind_of(source) or _kind_of(name) or "text"
    if kind == "pdf":
        sections = _pdf_sections(source, data)
    else:
        text = _decode(source, data)
        sections = {"html": _html_sections, "markdown": _markdown_sections}.get(kind, _text_sections)(text)
    sections = _with_offsets([(t, p, h) for t, p, h in sections if t.strip()])
    if not sections:
        raise RayFTError(f"{source}: no text in this {kind} file")
    return Document(name, source, kind, tuple(sections))


def _with_offsets(parts: list[tuple[str, int | None, str | None]]) -> list[Section]:
    out, start = [], 0
    for text, page, heading in parts:
        text = text.strip()
        out.append(Section(text, start, page, heading))
        start += len(text) + 2  # sections joined by a blank line
    return out


def _decode(source: str, data: bytes) -> str:
    """UTF-8 text (sources.decode_text), refusing binary data that happens to decode."""
    nul = data.find(b"\0")
    if nul >= 0 and data.strip():
        raise RayFTError(f"{source}: binary data, not text (NUL byte at offset {nul})")
    return decode_text(source, data)


def _pdf_sections(source: str, data: bytes) -> list[tuple[str, int | None, str | None]]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    if not data.startswith(b"%PDF"):
        raise RayFTError(f"{source}: not a PDF file (no %PDF header)")
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):  # an owner-only password still opens
            raise RayFTError(f"{source}: encrypted PDF: a password is needed to read it")
        pages = [(page.extract_text() or "", n + 1, None) for n, page in enumerate(reader.pages)]
    except RayFTError:
        raise
    # NotImplementedError: a stream filter pypdf does not decode (found by tests/data/test_reader_fuzz.py).
    except (PyPdfError, ValueError, KeyError, TypeError, OSError, NotImplementedError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RayFTError(f"{source}: corrupt PDF ({first})") from None
    if not any(t.strip() for t, _, _ in pages):
        raise RayFTError(f"{source}: the PDF has no extractable text (scanned pages need OCR first)")
    return pages


def _text_sections(text: str) -> list[tuple[str, int | None, str | None]]:
    return [(text, None, None)]


def _markdown_sections(text: str) -> list[tuple[str, int | None, str | None]]:
    """One section per heading: the text under it, with the path of headings above as metadata.
    markdown-it parses it (ATX and setext headings, code fences that hold '#' lines)."""
    from markdown_it import MarkdownIt

    tokens = MarkdownIt("commonmark").parse(text)
    sections: list[tuple[str, int | None, str | None]] = []
    path: list[tuple[int, str]] = []
    body: list[str] = []

    def flush():
        if body:
            sections.append(("\n".join(body), None, " > ".join(h for _, h in path) or None))
            body.clear()

    for i, tok in enumerate(tokens):
        if tok.type == "heading_open":
            flush()
            level, title = int(tok.tag[1]), _inline_text(tokens[i + 1])
            path = [(lv, h) for lv, h in path if lv < level] + [(level, title)]
        elif tok.type == "inline" and tokens[i - 1].type != "heading_open":
            body.append(_inline_text(tok))
        elif tok.type in ("fence", "code_block"):
            body.append(tok.content.rstrip("\n"))
    flush()
    return sections


def _inline_text(tok) -> str:
    """An inline token's text without its markup (emphasis, links keep their words)."""
    parts = []
    for child in tok.children or []:
        if child.type in ("text", "code_inline"):
            parts.append(child.content)
        elif child.type == "softbreak":
            parts.append(" ")
        elif child.type == "hardbreak":
            parts.append("\n")
    return "".join(parts).strip()


class _HTMLText(HTMLParser):
    """The readable text of a page by heading: scripts, styles and page furniture (navigation,
    header, footer, aside, forms) are left out; block elements end lines."""

    SKIP = {"script", "style", "noscript", "template", "svg", "nav", "header", "footer", "aside", "form",
            "head", "iframe", "button", "select"}
    BLOCK = {"p", "div", "li", "tr", "br", "section", "article", "main", "blockquote", "pre", "table",
             "ul", "ol", "dd", "dt", "figcaption"}
    VOID = {"br", "img", "hr", "meta", "link", "input", "area", "base", "col", "embed", "source", "wbr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []  # open skipped elements
        self.heading: list[tuple[int, str]] = []
        self.in_heading: int | None = None
        self.heading_text: list[str] = []
        self.body: list[str] = []
        self.sections: list[tuple[str, int | None, str | None]] = []

    def handle_starttag(self, tag, attrs):
        role = dict(attrs).get("role") or ""
        if self.stack or tag in self.SKIP or role in ("navigation", "banner", "contentinfo"):
            if tag not in self.VOID:
                self.stack.append(tag)
            return
        if tag in ("h1", "h2", "h3", "h4", "h5", "h6"):
            self._flush()
            self.in_heading, self.heading_text = int(tag[1]), []
        elif tag in self.BLOCK:
            self.body.append("\n")

    def handle_endtag(self, tag):
        if self.stack:
            if tag in self.stack:  # close up to the matching element (HTML forgives unclosed tags)
                while self.stack and self.stack.pop() != tag:
                    pass
            return
        if self.in_heading is not None and tag == f"h{self.in_heading}":
            title = " ".join("".join(self.heading_text).split())
            self.heading = [(lv, h) for lv, h in self.heading if lv < self.in_heading] + [(self.in_heading, title)]
            self.in_heading = None
        elif tag in self.BLOCK:
            self.body.append("\n")

    def handle_data(self, data):
        if self.stack:
            return
        (self.heading_text if self.in_heading is not None else self.body).append(data)

    def _flush(self):
        lines = [" ".join(ln.split()) for ln in "".join(self.body).split("\n")]
        text = "\n".join(ln for ln in lines if ln)
        if text:
            self.sections.append((text, None, " > ".join(h for _, h in self.heading) or None))
        self.body = []

    def close(self):
        super().close()
        self._flush()


def _html_sections(text: str) -> list[tuple[str, int | None, str | None]]:
    parser = _HTMLText()
    parser.feed(text)
    parser.close()
    return parser.sections


# --- reading on Ray Data ---------------------------------------------------------------------

def read_one(row: dict) -> dict:
    """Ray Data task body: one file -> {"document": dict} or {"error": one-line message}."""
    try:
        doc = parse_document(row["source"], row["name"], read_bytes(row["source"]))
        # JSON text: a column of nested dicts whose page is null in some rows would not convert
        return {"source": row["source"], "document": json.dumps(doc.to_dict(), ensure_ascii=False), "error": ""}
    except RayFTError as err:
        return {"source": row["source"], "document": "", "error": str(err)}


def read_documents(entries: list[str], on_error: str = "raise") -> tuple[list[Document], DocumentReport]:
    """Every document of `entries`, read and parsed on Ray Data (one task per file), in listing
    order. A file that cannot be read raises its one-line error, or (on_error: skip) is counted."""
    import ray

    files = list_documents(entries)
    report = DocumentReport(files=len(files))
    ds = ray.data.from_items([{"source": s, "name": n} for s, n in files], override_num_blocks=len(files))
    results = {r["source"]: r for r in ds.map(read_one, num_cpus=0.5).take_all()}
    docs = []
    for source, _ in files:
        r = results[source]
        if r["error"]:
            if on_error == "raise":
                raise RayFTError(r["error"])
            report.skipped += 1
            if len(report.skipped_examples) < KEPT_EXAMPLES:
                report.skipped_examples.append(r["error"])
            log.warning("skipped %s", r["error"])
            continue
        doc = Document.from_dict(json.loads(r["document"]))
        docs.append(doc)
        report.by_kind[doc.kind] = report.by_kind.get(doc.kind, 0) + 1
        report.characters += sum(len(s.text) for s in doc.sections)
    report.read = len(docs)
    if not docs:
        raise RayFTError(f"data.documents: none of the {len(files)} files could be read "
                         f"(first: {report.skipped_examples[0] if report.skipped_examples else '?'})")
    return docs, report
