"""The eval set: held out of `data.source` by passage (`data.eval_size`), or a separate file
(`eval.source`), checked for what it shares with the training data.

A separate eval set is read with the same readers and URI forms as `data.source` and the same
bad-record policy (`data.on_error`, `data.bad_answer`); it must hold QA records. Leakage is
exact after whitespace normalisation: an eval passage that is also a training passage, or an eval
question that is also a training question. `eval.leakage` decides: `drop` (default) takes those
eval questions out, `warn` keeps them and logs, `error` stops naming both files. Either way the
counts go to the manifest and the report.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from ray_ft.config import JobConfig
from ray_ft.data.readers import SourceData, read_source
from ray_ft.data.records import QARecord
from ray_ft.data.split import split_by_group
from ray_ft.errors import RayFTError

log = logging.getLogger(__name__)


def normalized(text: str) -> str:
    """Whitespace runs as one space, ends stripped: the key two texts are compared by."""
    return " ".join(text.split())


def read_eval_source(cfg: JobConfig) -> SourceData | None:
    """The records of `eval.source` (None when it is not set); a one-line error when they are not QA."""
    e, d = cfg.eval, cfg.data
    if e.source is None:
        return None
    data = read_source(e.source, e.format, d.on_error, d.bad_answer)
    if not data.is_qa:
        raise RayFTError(f"{e.source}: eval.source holds {data.format} records; an eval set needs QA "
                         "records (squad or qa_rows: a question, its passage and reference answers)")
    return data


@dataclass(frozen=True)
class Leakage:
    """What the eval set shares with the training data (exact after whitespace normalisation)."""

    policy: str
    shared_passages: int  # distinct eval passages that are training passages too
    shared_questions: int  # eval questions whose text is a training question's
    affected_questions: int  # eval questions over a shared passage or with a shared question
    dropped_questions: int  # of those, taken out of the eval set (policy drop)

    def to_dict(self) -> dict:
        return asdict(self)


def check_leakage(train: list[QARecord], held: list[QARecord], policy: str, train_name: str,
                  eval_name: str) -> tuple[list[QARecord], Leakage]:
    """(`held` after the policy, the counts). `error`: a one-line RayFTError naming both files."""
    passages = {normalized(r.context) for r in train}
    questions = {normalized(r.question) for r in train}
    shared_p = {normalized(r.context) for r in held} & passages
    leaked = [r for r in held if normalized(r.context) in shared_p or normalized(r.question) in questions]
    shared_q = sum(normalized(r.question) in questions for r in held)
    if leaked and policy == "error":
        raise RayFTError(f"{eval_name}: the eval set shares {len(shared_p)} passage(s) and {shared_q} question(s) "
                         f"with the training data {train_name} ({len(leaked)} eval questions affected; exact "
                         "after whitespace normalisation); eval.leakage: error. Use drop to evaluate without them")
    if leaked and policy == "warn":
        log.warning("%s: %d eval questions share a passage or a question with %s (eval.leakage: warn keeps them)",
                    eval_name, len(leaked), train_name)
    kept = held
    if leaked and policy == "drop":
        out = {id(r) for r in leaked}
        kept = [r for r in held if id(r) not in out]
        if not kept:
            raise RayFTError(f"{eval_name}: every eval question shares a passage or a question with the "
                             f"training data {train_name}; nothing is left to evaluate")
    dropped = len(held) - len(kept)
    return kept, Leakage(policy, len(shared_p), shared_q, len(leaked), dropped)


def train_and_eval(cfg: JobConfig, source: SourceData, eval_data: SourceData | None
                   ) -> tuple[list, list[QARecord] | list, Leakage | None]:
    """(training items, eval items, leakage) of the prepare stage. Without `eval_data`: a seeded
    `data.eval_size` share of the groups (passages; for instruction data, distinct first prompts)
    is held out. With it: every record of the source trains and `eval_data` is checked for
    leakage against the training QA records (instruction data has no passages to compare)."""
    d = cfg.data
    items = source.qa if source.is_qa else source.chats
    if eval_data is None:
        group_of = (lambda r: r.passage_id) if source.is_qa else (lambda c: c.group)
        train, held = split_by_group(items, group_of, d.eval_size, d.seed)
        return train, held, None
    if not source.is_qa:
        return items, eval_data.qa, None
    held, leakage = check_leakage(items, eval_data.qa, cfg.eval.leakage, d.source, cfg.eval.source)
    return items, held, leakage
