"""The terms the full-text index reads for text in scripts without spaces.

LanceDB's tokenizers split on spaces and punctuation, which keeps a Chinese sentence as one
token; its n-gram tokenizer lost 2.5 hit@1 points on CMRC2018 (bench/RESULTS.md). For CJK runs
the knowledge base indexes their characters and character bigrams instead (bigrams keep most
two-character words together), written one space apart to a `terms` column.
"""

from __future__ import annotations

import re

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_TOKEN = re.compile(rf"[{_CJK}]+|[^\W{_CJK}]+", re.UNICODE)


def lexical_tokens(text: str) -> list[str]:
    """Lower-cased words; a CJK run gives its characters and its character bigrams."""
    out = []
    for run in _TOKEN.findall(text.lower()):
        if re.match(rf"[{_CJK}]", run):
            out += list(run) + [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            out.append(run)
    return out
