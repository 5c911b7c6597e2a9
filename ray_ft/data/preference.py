"""Preference pairs: `{prompt | messages, chosen, rejected}` JSON/JSONL (TRL's and LLaMA-Factory's
explicit-prompt layout), read into `PreferencePair`s and tokenized with the chat template.

- `prompt`: a string (one user turn), or a list of messages: an optional system message, then
  user/assistant turns ending with a user turn. `messages` is the same list under another name.
- `chosen` / `rejected`: a string, one assistant message `{"role": "assistant", "content"}`, or
  a list holding exactly that message.
- `id` is optional (records are named by position); `system` (a string) replaces the job's
  system prompt for that record.

A pair whose chosen and rejected replies are the same text teaches nothing: a record error
(raised, or skipped and counted under `data.on_error: skip`), as is every missing or mistyped
field. A tokenized pair is one row: the prompt's token ids (rendered as the server renders it)
and both completions' ids (reply + end-of-turn tokens), so the prompt is stored once.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ray_ft.data.evalset import normalized
from ray_ft.data.records import passage_id_of
from ray_ft.data.shards import name_parts
from ray_ft.data.sources import (
    Problems, ReadReport, RecordError, decode_text, iter_json_records, read_bytes, read_records)
from ray_ft.data.tokenize import IGNORE_INDEX, tokenize_conversation
from ray_ft.errors import RayFTError


@dataclass(frozen=True)
class PreferencePair:
    id: str
    group: str  # split key: the hash of the prompt's user turns
    system: str | None
    prompt: tuple[dict, ...]  # user/assistant messages ending with a user turn
    chosen: str
    rejected: str

    def messages(self, default_system: str, reply: str) -> list[dict]:
        return [{"role": "system", "content": self.system or default_system}, *self.prompt,
                {"role": "assistant", "content": reply}]


def _prompt(obj: dict) -> tuple[str | None, list[dict]]:
    key = "prompt" if "prompt" in obj else "messages"
    value = obj.get(key)
    if isinstance(value, str):
        if not value.strip():
            raise RecordError("field 'prompt' is empty")
        return None, [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise RecordError("field 'prompt' (or 'messages') missing: a string or a list of messages")
    system, msgs = None, []
    for m, msg in enumerate(value):
        if not isinstance(msg, dict) or not isinstance(msg.get("content"), str) or not msg["content"].strip():
            raise RecordError(f"field '{key}[{m}].content' missing, empty or not a string")
        role = msg.get("role")
        if role == "system" and m == 0:
            system = msg["content"]
            continue
        want = "user" if len(msgs) % 2 == 0 else "assistant"
        if role != want:
            raise RecordError(f"field '{key}[{m}].role': expected {want}, got {role!r}")
        msgs.append({"role": role, "content": msg["content"]})
    if not msgs or msgs[-1]["role"] != "user":
        raise RecordError(f"field '{key}': must end with a user turn")
    return system, msgs


def _reply(obj: dict, key: str) -> str:
    value = obj.get(key)
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, dict):
        if value.get("role") != "assistant":
            raise RecordError(f"field '{key}': the message's role must be assistant")
        value = value.get("content")
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"field '{key}' missing or empty: a string or one assistant message")
    return value


def preference_pair(obj: object, where: str) -> PreferencePair:
    if not isinstance(obj, dict):
        raise RecordError("expected an object")
    system, prompt = _prompt(obj)
    own = obj.get("system")
    if own is not None and not isinstance(own, str):
        raise RecordError("field 'system' is not a string")
    chosen, rejected = _reply(obj, "chosen"), _reply(obj, "rejected")
    if normalized(chosen) == normalized(rejected):
        raise RecordError("fields 'chosen' and 'rejected' are the same reply")
    rid = obj.get("id")
    rid = str(rid) if isinstance(rid, (str, int)) and str(rid) != "" else where.replace("line ", "L")
    group = passage_id_of("\0".join(m["content"] for m in prompt if m["role"] == "user"))
    return PreferencePair(rid, group, own or system, tuple(prompt), chosen, rejected)


def read_preference_pairs(name: str, records: Iterable[tuple[str, object]], problems: Problems
                          ) -> list[PreferencePair]:
    """Pairs of `records` ((position, object) pairs)."""
    return read_records(name, records, preference_pair, problems, "preference")


def tokenize_pair(tokenizer, pair: PreferencePair, default_system: str) -> dict:
    """{prompt_ids, chosen_ids, rejected_ids}: earlier assistant turns are prompt; each completion
    is its reply's tokens with the template's end of turn."""
    rows = []
    for reply in (pair.chosen, pair.rejected):
        msgs = pair.messages(default_system, reply)
        n_replies = sum(m["role"] == "assistant" for m in msgs)
        ex = tokenize_conversation(tokenizer, msgs, train=[False] * (n_replies - 1) + [True])
        start = next(i for i, x in enumerate(ex.labels) if x != IGNORE_INDEX)
        rows.append((ex.input_ids[:start], ex.input_ids[start:]))
    (prompt, chosen), (prompt_r, rejected) = rows
    if prompt != prompt_r:
        raise RayFTError(f"chat template of '{tokenizer.name_or_path}' renders the prompt differently before "
                         "two replies; cannot share it")
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def read_preference_source(source: str, on_error: str = "raise") -> tuple[list[PreferencePair], ReadReport]:
    """The pairs of a JSON array or JSONL file (local or a URI) and what reading skipped."""
    report = ReadReport(format="preference")
    text = decode_text(source, read_bytes(source))
    pairs = read_preference_pairs(source, iter_json_records(source, text, Problems(on_error, report)),
                                  Problems(on_error, report))
    return pairs, report


PAIR_COLUMNS = ("id", "prompt_ids", "chosen_ids", "rejected_ids")


@dataclass(frozen=True)
class PairShards:
    """Tokenized pairs: the training rows as parquet (Ray Data reads them into the workers) and
    the dev rows in memory (they travel in the loop config, like SFT's dev split)."""

    train_dir: Path
    train_rows: int
    dev_rows: list[dict]
    manifest: dict


class TokenizePairs:
    """Ray Data batch UDF: pairs -> {id, prompt_ids, chosen_ids, rejected_ids, length}, where
    length is the longer of the two sequences (prompt + completion)."""

    def __init__(self, model_dir: str, default_system: str):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.default_system = default_system

    def __call__(self, batch):
        import pyarrow as pa

        out: dict[str, list] = {k: [] for k in (*PAIR_COLUMNS, "split", "length")}
        for row in batch.to_pylist():
            pair = PreferencePair(row["id"], "", row["system"], tuple(json.loads(row["prompt"])),
                                  row["chosen"], row["rejected"])
            ids = tokenize_pair(self.tok, pair, self.default_system)
            for k in PAIR_COLUMNS[1:]:
                out[k].append(ids[k])
            out["id"].append(row["id"])
            out["split"].append(row["split"])
            out["length"].append(len(ids["prompt_ids"]) + max(len(ids["chosen_ids"]), len(ids["rejected_ids"])))
        return pa.table(out)


def write_pair_shards(train: list[PreferencePair], dev: list[PreferencePair], model_dir: str,
                      default_system: str, max_len: int, out_dir: Path, num_shards: int) -> PairShards:
    """Tokenize `train` and `dev` on Ray Data (in the given order), drop pairs longer than
    `max_len` tokens (counted), write the training rows to `out_dir/train/*.parquet` (temp folder,
    then rename) and return the dev rows."""
    import ray

    rows = [{"id": p.id, "split": split, "system": p.system, "prompt": json.dumps(list(p.prompt)),
             "chosen": p.chosen, "rejected": p.rejected}
            for split, pairs in (("train", train), ("dev", dev)) for p in pairs]
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, True  # order kept -> same shards
    try:
        tokenized = ray.data.from_items(rows, override_num_blocks=max(1, min(num_shards * 2, len(rows)))).map_batches(
            TokenizePairs, fn_constructor_kwargs={"model_dir": model_dir, "default_system": default_system},
            batch_size=64, batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1).materialize()
        from ray.data.expressions import col

        kept = tokenized.filter(expr=col("length") <= max_len).materialize()
        counts = {split: kept.filter(expr=col("split") == split).count() for split in ("train", "dev")}
        if counts["train"] < num_shards:
            raise RayFTError(f"{counts['train']} preference pairs fit data.cutoff_len={max_len}; "
                             f"{num_shards} training workers need at least one each")
        out_dir.mkdir(parents=True, exist_ok=True)
        final = out_dir / "train"
        tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".train."))
        kept.filter(expr=col("split") == "train").select_columns(list(PAIR_COLUMNS)).repartition(num_shards) \
            .write_parquet(str(tmp))
        name_parts(tmp)
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        dev_rows = [{k: (r[k] if k == "id" else [int(x) for x in r[k]]) for k in PAIR_COLUMNS}
                    for r in kept.filter(expr=col("split") == "dev").take_all()]
    finally:
        options.preserve_order = before
    manifest = {"train_pairs": counts["train"], "dev_pairs": counts["dev"],
                "dropped_over_cutoff_len": len(rows) - counts["train"] - counts["dev"]}
    return PairShards(final, counts["train"], dev_rows, manifest)
