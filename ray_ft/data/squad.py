"""SQuAD-style QA corpora (CMRC2018, DRCD, SQuAD v1) from a local JSON file or the HF hub.

Every record is validated; a bad one raises a one-line RayFTError naming the file, the record's
position and id, and the field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from ray_ft.errors import RayFTError


@dataclass(frozen=True)
class QARecord:
    id: str
    passage_id: str
    context: str
    question: str
    answers: tuple[str, ...]

    def to_row(self) -> dict:
        row = asdict(self)
        row["answers"] = list(self.answers)
        return row


def passage_id_of(context: str) -> str:
    return hashlib.sha1(context.encode("utf-8")).hexdigest()[:16]


def read_qa_source(source: str) -> list[QARecord]:
    """Read `source`: a local SQuAD JSON path or `hf://NAME[:SPLIT]`."""
    if source.startswith("hf://"):
        return _read_hf(source)
    return read_squad_json(Path(source))


def read_squad_json(path: Path) -> list[QARecord]:
    if not path.is_file():
        raise RayFTError(f"{path}: file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RayFTError(f"{path}: not UTF-8 text (byte {err.start})") from None
    except json.JSONDecodeError as err:
        raise RayFTError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise RayFTError(f"{path}: field 'data' missing: expected SQuAD layout {{\"data\": [...]}}")
    records: list[QARecord] = []
    seen: set[str] = set()
    for i, article in enumerate(doc["data"]):
        paragraphs = article.get("paragraphs") if isinstance(article, dict) else None
        if not isinstance(paragraphs, list):
            raise RayFTError(f"{path}: data[{i}]: field 'paragraphs' missing or not a list")
        for j, para in enumerate(paragraphs):
            where = f"data[{i}].paragraphs[{j}]"
            context = para.get("context") if isinstance(para, dict) else None
            if not isinstance(context, str) or not context.strip():
                raise RayFTError(f"{path}: {where}: field 'context' missing or empty")
            qas = para.get("qas")
            if not isinstance(qas, list):
                raise RayFTError(f"{path}: {where}: field 'qas' missing or not a list")
            for k, qa in enumerate(qas):
                rec = _record(qa, context, f"{path}: {where}.qas[{k}]")
                if rec.id in seen:
                    raise RayFTError(f"{path}: {where}.qas[{k}] (id={rec.id}): duplicate id")
                seen.add(rec.id)
                records.append(rec)
    if not records:
        raise RayFTError(f"{path}: no questions found")
    return records


def _record(qa: object, context: str, where: str) -> QARecord:
    if not isinstance(qa, dict):
        raise RayFTError(f"{where}: expected an object")
    qid = qa.get("id")
    if not isinstance(qid, (str, int)) or str(qid) == "":
        raise RayFTError(f"{where}: field 'id' missing")
    where = f"{where} (id={qid})"
    question = qa.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RayFTError(f"{where}: field 'question' missing or empty")
    answers = qa.get("answers")
    if not isinstance(answers, list) or not answers:
        raise RayFTError(f"{where}: field 'answers' is empty")
    texts = []
    for a, ans in enumerate(answers):
        text = ans.get("text") if isinstance(ans, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise RayFTError(f"{where}: field 'answers[{a}].text' missing or empty")
        texts.append(text.strip())
    return QARecord(str(qid), passage_id_of(context), context, question.strip(), tuple(texts))


def records_from_hf_rows(rows, source: str) -> list[QARecord]:
    """Rows of the HF `cmrc2018`/`squad` layout: id, context, question, answers{text[], answer_start[]}."""
    records = []
    for n, row in enumerate(rows):
        answers = row.get("answers") or {}
        qa = {"id": row.get("id"), "question": row.get("question"),
              "answers": [{"text": t} for t in (answers.get("text") or [])]}
        context = row.get("context")
        if not isinstance(context, str) or not context.strip():
            raise RayFTError(f"{source}: row {n} (id={row.get('id')}): field 'context' missing or empty")
        records.append(_record(qa, context, f"{source}: row {n}"))
    if not records:
        raise RayFTError(f"{source}: no questions found")
    return records


def _read_hf(source: str) -> list[QARecord]:
    name, _, split = source.removeprefix("hf://").partition(":")
    split = split or "validation"
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as err:  # offline, unknown name, unknown split: all reported the same way
        raise RayFTError(f"{source}: could not load from the Hugging Face Hub ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return records_from_hf_rows(ds, source)
