"""QA corpora: SQuAD-style JSON (CMRC2018, DRCD, SQuAD v1) and flat QA rows (a CSV such as
Financial-QA-10k, a JSONL of `{question, answer(s), context}`, or Hugging Face rows).

Every record is validated; a bad one is reported through `Problems` with the file, the record's
position and id, and the field. Reference answers are checked against their context where the
source gives offsets (extractive QA): an offset that does not point at its text is moved to
where the text is, and a reference that is not in the context at all is dropped (both counted),
or, with `bad_answer: raise`, either one is an error. Flat rows without offsets may be
abstractive (Financial-QA-10k's answers are sentences written about the passage): not checked.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable

from ray_ft.data.records import QARecord, passage_id_of
from ray_ft.data.sources import Problems, ReadReport, RecordError, parse_json


class AnswerChecker:
    """Verifies reference answers against the context under the `bad_answer` policy."""

    def __init__(self, bad_answer: str, report: ReadReport):
        if bad_answer not in ("raise", "repair"):
            raise ValueError(f"bad_answer must be 'raise' or 'repair', not {bad_answer!r}")
        self.strict, self.report = bad_answer == "raise", report

    def check(self, context: str, answers: list[tuple[str, int | None]], extractive: bool,
              ) -> tuple[tuple[str, ...], int]:
        """(stripped texts kept, offset of the first kept one in the context or -1)."""
        kept: list[str] = []
        first_start = -1
        fixes = drops = 0
        for a, (raw, start) in enumerate(answers):
            text = raw.strip()
            lead = len(raw) - len(raw.lstrip())
            if start is not None and start >= 0 and context[start:start + len(raw)] == raw:
                pos = start + lead
            elif text in context:
                pos = _nearest(context, text, start)
                if extractive and start is not None:
                    if self.strict:
                        raise RecordError(f"field 'answers[{a}].answer_start': {start} does not point "
                                          f"at the answer text (it is at {pos})")
                    fixes += 1
            elif extractive:
                if self.strict:
                    raise RecordError(f"field 'answers[{a}]': {_short(text)!r} is not in the context")
                drops += 1
                continue
            else:
                pos = -1
            if not kept:
                first_start = pos
            kept.append(text)
        if not kept:
            raise RecordError("field 'answers': no reference answer occurs in the context")
        # Counted only for records that are kept, so the numbers describe the data used.
        self.report.answer_start_fixed += fixes
        self.report.answers_dropped += drops
        return tuple(kept), first_start


def _nearest(context: str, text: str, start: int | None) -> int:
    positions, i = [], context.find(text)
    while i >= 0:
        positions.append(i)
        i = context.find(text, i + 1)
    return min(positions, key=lambda p: abs(p - (start if start is not None else 0)))


def _short(text: str, n: int = 40) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _nonempty_str(obj: dict, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field '{key}' missing or empty")
    return value


def read_squad(name: str, text: str, problems: Problems, checker: AnswerChecker) -> list[QARecord]:
    """Records of a SQuAD-layout document `{"data": [{"paragraphs": [{context, qas}]}]}`."""
    from ray_ft.errors import RayFTError

    doc = parse_json(name, text)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise RayFTError(f"{name}: field 'data' missing: expected SQuAD layout {{\"data\": [...]}}")
    records: list[QARecord] = []
    seen: set[str] = set()
    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            problems.bad(f"{name}: data[{i}]: field 'paragraphs' missing or not a list")
            continue
        for j, para in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            context = para.get("context") if isinstance(para, dict) else None
            qas = para.get("qas") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                problems.bad(f"{name}: {where}: field 'context' missing or empty")
                continue
            if not isinstance(qas, list):
                problems.bad(f"{name}: {where}: field 'qas' missing or not a list")
                continue
            for k, qa in enumerate(qas):
                problems.keep(records, seen, f"{name}: {where}.qas[{k}]",
                              lambda qa=qa, context=context: _squad_record(qa, context, checker))
    problems.report.records_read = len(records)
    if not records:
        raise RayFTError(f"{name}: no usable questions found")
    return records


def _squad_record(qa: object, context: str, checker: AnswerChecker) -> QARecord:
    if not isinstance(qa, dict):
        raise RecordError("expected an object")
    qid = qa.get("id")
    if not isinstance(qid, (str, int)) or str(qid) == "":
        raise RecordError("field 'id' missing")
    try:
        question = _nonempty_str(qa, "question")
        answers = qa.get("answers")
        if not isinstance(answers, list) or not answers:
            raise RecordError("field 'answers' is empty")
        pairs = []
        for a, ans in enumerate(answers):
            text = ans.get("text") if isinstance(ans, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise RecordError(f"field 'answers[{a}].text' missing or empty")
            start = ans.get("answer_start")
            pairs.append((text, start if isinstance(start, int) else None))
        texts, first = checker.check(context, pairs, extractive=True)
    except RecordError as err:
        raise RecordError(str(err), record_id=str(qid)) from None
    return QARecord(str(qid), passage_id_of(context), context, question.strip(), texts, first)


def read_qa_rows(name: str, rows: Iterable[tuple[str, dict]], problems: Problems,
                 checker: AnswerChecker) -> list[QARecord]:
    """Records of flat rows `{id?, question, context, answer | answers}`.

    `answers` may be a list of strings or the HF SQuAD layout `{"text": [...], "answer_start":
    [...]}` (offsets given: checked as extractive). Rows without `id` are named by their
    position (`line12`, `row5`).
    """
    from ray_ft.errors import RayFTError

    records: list[QARecord] = []
    seen: set[str] = set()
    for where, row in rows:
        problems.keep(records, seen, f"{name}: {where}",
                      lambda row=row, where=where: _row_record(row, checker, where.replace(" ", "")))
    problems.report.records_read = len(records)
    if not records:
        raise RayFTError(f"{name}: no usable questions found")
    return records


def _row_record(row: object, checker: AnswerChecker, default_id: str) -> QARecord:
    if isinstance(row, RecordError):  # the reader could not make a row of it
        raise row
    if not isinstance(row, dict):
        raise RecordError("expected an object")
    own = row.get("id")
    own = str(own) if isinstance(own, (str, int)) and str(own) != "" else None
    try:
        question, context = _nonempty_str(row, "question"), _nonempty_str(row, "context")
        pairs, extractive = _row_answers(row)
        texts, first = checker.check(context, pairs, extractive)
    except RecordError as err:
        if own is None:  # the position already names the record
            raise
        raise RecordError(str(err), record_id=own) from None
    qid = own or default_id
    return QARecord(qid, passage_id_of(context), context, question.strip(), texts, first)


def _row_answers(row: dict) -> tuple[list[tuple[str, int | None]], bool]:
    if "answers" in row:
        answers = row["answers"]
        if isinstance(answers, dict):  # HF SQuAD layout
            texts, starts = answers.get("text") or [], answers.get("answer_start") or []
            pairs = [(t, starts[i] if i < len(starts) and isinstance(starts[i], int) else None)
                     for i, t in enumerate(texts)]
        elif isinstance(answers, list):
            pairs = [(t, None) for t in answers]
        else:
            raise RecordError("field 'answers' must be a list or {text: [...], answer_start: [...]}")
    elif "answer" in row:
        pairs = [(row["answer"], None)]
    else:
        raise RecordError("field 'answer' missing")
    if not pairs:
        raise RecordError("field 'answers' is empty")
    for a, (text, _) in enumerate(pairs):
        if not isinstance(text, str) or not text.strip():
            field = "answer" if "answer" in row and "answers" not in row else f"answers[{a}]"
            raise RecordError(f"field '{field}' missing or empty")
    return pairs, any(start is not None for _, start in pairs)


def csv_rows(name: str, text: str, required: tuple[str, ...]) -> Iterable[tuple[str, dict | RecordError]]:
    """(`line N`, row) of a CSV with a header; the line is where the record starts (blank lines
    are skipped but counted). A row with more fields than the header comes as a RecordError (the
    caller's policy decides); missing trailing fields read as None."""
    from ray_ft.errors import RayFTError

    reader = csv.reader(io.StringIO(text, newline=""))
    start, header = 1, None
    try:
        for fields in reader:
            if fields:  # a blank line reads as []
                if header is None:
                    header = fields
                    missing = set(required) - set(header)
                    if missing:
                        raise RayFTError(f"{name}: header lacks column(s) {sorted(missing)}; found {header}")
                elif len(fields) > len(header):  # a broken quote or a stray comma
                    yield f"line {start}", RecordError(f"{len(fields)} fields, the header has {len(header)}")
                else:
                    values = [v.strip() for v in fields] + [None] * (len(header) - len(fields))
                    yield f"line {start}", dict(zip(header, values))
            start = reader.line_num + 1
    except csv.Error as err:
        raise RayFTError(f"{name}: line {start}: invalid CSV: {err}") from None
    if header is None:
        raise RayFTError(f"{name}: header lacks column(s) {sorted(required)}; found []")
