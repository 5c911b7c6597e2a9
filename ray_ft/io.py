"""File writes that never leave a half-written file: write a temp file beside, then rename."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


@contextmanager
def staged_dir(out: Path) -> Iterator[Path]:
    """A temp folder beside `out` to write into; it replaces `out` only when the block completes,
    and is removed if the block raises, so readers never see a half-built folder. Temp folders of
    `out` already there are a killed writer's (SIGKILL runs no cleanup; callers hold the run
    folder's lock, `ray_ft.locks`, so no live writer owns one) and are removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        yield tmp
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def jsonl_lines(text: str) -> list[str]:
    """The lines of a JSONL text. Only "\n" ends a line: JSON strings may hold U+2028, U+0085 and
    other characters that str.splitlines() would also split on (json.dumps(ensure_ascii=False)
    writes them raw)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def read_jsonl(path: Path) -> list[dict]:
    from ray_ft.errors import RayFTError

    rows = []
    for n, line in enumerate(jsonl_lines(path.read_text(encoding="utf-8")), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise RayFTError(f"{path}: line {n}: invalid JSON at column {err.colno}: {err.msg}") from None
    return rows


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
