"""One entry point for every SFT data source: `read_source(source, format)`.

    local path | s3://, gs://, file://... (pyarrow filesystems) | hf://NAME[:SPLIT]
      -> squad | qa_rows (CSV, JSONL, HF rows) -> QARecords (train + eval set + knowledge base)
      -> alpaca | messages                     -> Conversations (train + dev + test)
"""

from __future__ import annotations

from dataclasses import dataclass

from ray_ft.data.chat import read_conversations
from ray_ft.data.qa import AnswerChecker, csv_rows, read_qa_rows, read_squad
from ray_ft.data.records import Conversation, QARecord
from ray_ft.data.sources import (
    Problems, ReadReport, decode_text, detect_format, format_of_record, iter_json_records, read_bytes,
    suffix_of,
)
from ray_ft.errors import RayFTError

QA_FORMATS = ("squad", "qa_rows")
CHAT_FORMATS = ("alpaca", "messages")


@dataclass
class SourceData:
    format: str
    report: ReadReport
    qa: list[QARecord] | None = None
    chats: list[Conversation] | None = None

    @property
    def is_qa(self) -> bool:
        return self.qa is not None


def read_source(source: str, fmt: str = "auto", on_error: str = "raise",
                bad_answer: str = "repair") -> SourceData:
    """Read and validate `source`; bad records raise or are skipped and counted (`on_error`)."""
    report = ReadReport()
    problems = Problems(on_error, report)
    checker = AnswerChecker(bad_answer, report)
    if source.startswith("hf://"):
        rows = load_hf_rows(source)
        if not rows:
            raise RayFTError(f"{source}: the dataset split is empty")
        fmt = format_of_record(source, rows[0]) if fmt == "auto" else fmt
        records = [(f"row {n}", row) for n, row in enumerate(rows)]
    else:
        text = decode_text(source, read_bytes(source))
        fmt = detect_format(source, text) if fmt == "auto" else fmt
        if fmt == "squad":
            report.format = fmt
            return SourceData(fmt, report, qa=read_squad(source, text, problems, checker))
        if suffix_of(source) == ".csv":
            records = csv_rows(source, text, ("question", "context"))
        else:
            records = iter_json_records(source, text, problems)
    report.format = fmt
    if fmt == "triplets":
        raise RayFTError(f"{source}: embedding triplets are an `embed.source`, not an SFT data.source")
    if fmt == "qa_rows":
        return SourceData(fmt, report, qa=read_qa_rows(source, records, problems, checker))
    if fmt in CHAT_FORMATS:
        return SourceData(fmt, report, chats=read_conversations(source, records, fmt, problems))
    raise RayFTError(f"{source}: format '{fmt}' cannot be read here; SFT sources are "
                     f"{', '.join(QA_FORMATS + CHAT_FORMATS)}")


def read_qa_source(source: str, fmt: str = "auto", on_error: str = "raise",
                   bad_answer: str = "repair") -> list[QARecord]:
    """QA records of a source that must be QA (benches, eval tools)."""
    data = read_source(source, fmt, on_error, bad_answer)
    if not data.is_qa:
        raise RayFTError(f"{source}: {data.format} instruction data has no passages; a QA source is needed")
    return data.qa


def load_hf_rows(source: str) -> list[dict]:
    name, _, split = source.removeprefix("hf://").partition(":")
    split = split or "validation"
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all reported the same way
        raise RayFTError(f"{source}: could not load from the Hugging Face Hub ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return list(ds)
