"""Opening a data source (local path, pyarrow filesystem URI, `hf://`) and telling its format.

Every reader reports problems the same way: a record-level problem is a `RecordError` naming the
field; `Problems` turns it into a one-line `RayFTError` naming the file and the record
(`on_error: raise`), or counts it and keeps the first few messages for the manifest (`skip`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ray_ft.errors import RayFTError
from ray_ft.io import jsonl_lines

FORMATS = ("squad", "qa_rows", "alpaca", "messages")  # SFT sources; "triplets" is embedding-only
KEPT_EXAMPLES = 5  # skipped-record messages kept in the manifest


class RecordError(ValueError):
    """One record is bad; the message names the field (the caller adds file and position, and
    `record_id` when the record's own id was read before the problem)."""

    def __init__(self, message: str, record_id: str | None = None):
        super().__init__(message)
        self.record_id = record_id


@dataclass
class ReadReport:
    """What the reader skipped or corrected; it goes into the manifest."""

    format: str = ""
    records_read: int = 0
    skipped_records: int = 0
    skipped_examples: list[str] = field(default_factory=list)
    answers_dropped: int = 0  # references not found in their context (bad_answer: drop)
    answer_start_fixed: int = 0  # offsets that did not point at the text, moved to where it is


def _shown(record_id: object) -> str:
    """A record id as an error shows it: on one line (newlines and control characters escaped,
    as JSON writes them; other text as is)."""
    return json.dumps(str(record_id), ensure_ascii=False)[1:-1]


class Problems:
    """Collects record-level problems under one policy."""

    def __init__(self, on_error: str, report: ReadReport):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error, self.report = on_error, report

    def keep(self, out: list, seen: set[str], where: str, make, record_id: str | None = None) -> None:
        """Append `make()` to `out`; a bad record (named with its id when known) or a repeated
        id is reported instead."""
        try:
            rec = make()
        except RecordError as err:
            rid = err.record_id if err.record_id is not None else record_id
            self.bad(f"{where}{f' (id={_shown(rid)})' if rid is not None else ''}: {err}")
            return
        if rec.id in seen:
            self.bad(f"{where} (id={_shown(rec.id)}): duplicate id")
            return
        seen.add(rec.id)
        out.append(rec)

    def bad(self, message: str) -> None:
        if self.on_error == "raise":
            raise RayFTError(message)
        self.report.skipped_records += 1
        if len(self.report.skipped_examples) < KEPT_EXAMPLES:
            self.report.skipped_examples.append(message)


def read_records(name: str, records, parse, problems: Problems, what: str) -> list:
    """`parse(obj, where)` of each (position, object) pair of `records`, under `problems`' policy;
    an error when none is usable."""
    out: list = []
    seen: set[str] = set()
    for where, obj in records:
        problems.keep(out, seen, f"{name}: {where}", lambda obj=obj, where=where: parse(obj, where),
                      record_id=obj.get("id") if isinstance(obj, dict) else None)
    problems.report.records_read = len(out)
    if not out:
        raise RayFTError(f"{name}: no usable {what} records found")
    return out


def is_uri(source: str) -> bool:
    return "://" in source


def suffix_of(source: str) -> str:
    """The lower-case file extension, a URI's query string (`?endpoint_override=...`) left out."""
    path = source.split("?", 1)[0] if is_uri(source) else source
    return Path(path).suffix.lower()


def read_bytes(source: str) -> bytes:
    """The whole file at a local path or a pyarrow filesystem URI (s3://, gs://, file://, ...)."""
    if not is_uri(source):
        path = Path(source)
        if not path.is_file():
            raise RayFTError(f"{source}: file not found")
        return path.read_bytes()
    import pyarrow as pa
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise RayFTError(f"{source}: file not found")
        with fs.open_input_stream(path) as f:
            return f.read()
    except (pa.ArrowException, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise RayFTError(f"{source}: cannot read ({first})") from None


def source_fingerprint(source: str) -> bytes:
    """What identifies the source's content cheaply: its bytes when local, size + mtime for a
    remote URI (reading a large object just to decide whether to reuse shards would cost a
    download), the name alone for `hf://` datasets (the hub caches by revision). A local folder
    (knowledge-base documents) is every file under it: names and bytes, so an edit is seen."""
    if source.startswith("hf://"):
        return source.encode()
    if not is_uri(source):
        path = Path(source)
        if path.is_dir():
            digest = hashlib.sha256()
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                digest.update(f"{f.relative_to(path).as_posix()}\0".encode())
                digest.update(hashlib.sha256(f.read_bytes()).digest())
            return digest.digest()
        return path.read_bytes() if path.is_file() else b""
    import pyarrow.fs as pafs

    try:
        fs, path = pafs.FileSystem.from_uri(source)
        info = fs.get_file_info(path)
        return f"{source}:{info.size}:{info.mtime_ns}".encode()
    except Exception:  # unreachable now: prepare will say why when it reads the file
        return source.encode()


def folder_fingerprint(name: str) -> bytes:
    """A local model folder's file names, sizes and mtimes (a re-trained model changes it); the
    name itself for anything else (a packaged model name, an object-store URI)."""
    path = Path(name)
    if not path.is_dir():
        return name.encode()
    return "".join(f"{p.relative_to(path)}:{p.stat().st_size}:{p.stat().st_mtime_ns};"
                   for p in sorted(path.rglob("*")) if p.is_file()).encode()


def decode_text(name: str, data: bytes) -> str:
    """UTF-8 text (a leading BOM is dropped); bad bytes and empty files are one-line errors."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise RayFTError(f"{name}: line {line}: not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise RayFTError(f"{name}: file is empty")
    return text


def read_text(source: str) -> str:
    return decode_text(source, read_bytes(source))


def iter_json_records(name: str, text: str, problems: Problems) -> Iterator[tuple[str, object]]:
    """(position, object) of a JSON array file or of a JSONL file (one object per line).

    A line that is not JSON is a record problem in JSONL; a whole JSON file that does not parse
    is fatal (its records cannot be told apart)."""
    if suffix_of(name) == ".jsonl":
        for n, line in enumerate(jsonl_lines(text), start=1):
            if not line.strip():
                continue
            try:
                yield f"line {n}", json.loads(line)
            except json.JSONDecodeError as err:
                problems.bad(f"{name}: line {n}: invalid JSON at column {err.colno}: {err.msg}")
        return
    doc = parse_json(name, text)
    if not isinstance(doc, list):
        raise RayFTError(f"{name}: expected a JSON array of records, got {type(doc).__name__}")
    for i, obj in enumerate(doc):
        yield f"[{i}]", obj


def parse_json(name: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise RayFTError(f"{name}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None


def detect_format(name: str, text: str) -> str:
    """The format of a file from its extension and first record."""
    suffix = suffix_of(name)
    if suffix == ".csv":
        return "qa_rows"
    if suffix == ".jsonl":
        n, first = next(((n, ln) for n, ln in enumerate(jsonl_lines(text), start=1) if ln.strip()), (1, ""))
        try:
            obj = json.loads(first)
        except json.JSONDecodeError as err:
            raise RayFTError(f"{name}: line {n}: invalid JSON at column {err.colno}: {err.msg}") from None
        return format_of_record(name, obj)
    if suffix == ".json":
        doc = parse_json(name, text)
        if isinstance(doc, dict) and "data" in doc:
            return "squad"
        if isinstance(doc, list) and doc:
            return format_of_record(name, doc[0])
        raise RayFTError(f"{name}: cannot tell the format: expected SQuAD {{\"data\": [...]}} or a "
                         "list of Alpaca/messages records; set data.format")
    raise RayFTError(f"{name}: cannot tell the format from the extension (.json, .jsonl, .csv); "
                     "set data.format")


def format_of_record(name: str, obj: object) -> str:
    """The format a JSON record's keys say it is in (hf:// rows and JSON/JSONL files alike)."""
    keys = set(obj) if isinstance(obj, dict) else set()
    if "messages" in keys:
        return "messages"
    if "instruction" in keys:
        return "alpaca"
    if {"query", "pos"} <= keys:
        return "triplets"
    if {"question", "context"} <= keys:
        return "qa_rows"
    raise RayFTError(f"{name}: cannot tell the format of the first record (keys {sorted(keys)}); "
                     "set data.format")
