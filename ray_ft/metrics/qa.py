"""QA metrics; pure functions on strings and vectors.

Two families, reported side by side and never mixed up:
- the seed recipe's definitions (`exact_match`, `origin_score`, `clipped_cosine`), kept literal so
  numbers compare with the recipe's;
- CMRC2018-style EM and F1 (`cmrc_exact_match`, `cmrc_f1`): the evaluation script's scheme
  (lower-case, punctuation dropped, mixed segmentation, F1 from the longest common token run, max
  over references) with three deliberate differences, each of which only matters for non-Chinese
  text: all Unicode punctuation is dropped (the script drops a fixed list of 33 characters and keeps
  ASCII `. , ? ! ( )` as tokens), non-CJK runs are split at whitespace (the script uses NLTK's
  word tokenizer), and EM compares token lists (the script compares strings, so "北京 大学" !=
  "北京大学" there). For Chinese answers with Chinese punctuation the scores are the script's;
- `origin_char_score`, a character-level origin that means something for Chinese, where the
  seed's word test degenerates to "is the whole answer a substring of the context".
"""

from __future__ import annotations

import string
import unicodedata

import numpy as np


def exact_match(prediction: str, references: list[str]) -> float:
    """Seed EM: 1.0 when the stripped prediction equals the stripped *first* reference answer."""
    if not references:
        raise ValueError("exact_match needs at least one reference answer")
    return float(prediction.strip() == references[0].strip())


def origin_score(answer: str, context: str) -> float:
    """Seed origin: 1.0 when every whitespace-separated word of the answer occurs in the context.

    An empty answer scores 0: it quotes nothing. (Chinese has no spaces, so for Chinese this is a
    substring test of each space-free run; see `origin_char_score`.)
    """
    words = answer.split()
    return float(bool(words) and all(w in context for w in words))


def _is_punct(ch: str) -> bool:
    # Unicode P* covers Chinese punctuation (，。《》…); ASCII symbols such as + = ^ ` ~ | $ are S*.
    return ch in string.punctuation or unicodedata.category(ch).startswith("P")


def _is_cjk(ch: str) -> bool:
    cp = ord(ch)
    return (0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0xF900 <= cp <= 0xFAFF
            or 0x20000 <= cp <= 0x2FA1F)


def cmrc_tokens(text: str) -> list[str]:
    """CMRC2018 mixed segmentation: lower-case, punctuation dropped, each CJK character one token,
    other text split at whitespace and CJK characters (so "Ray 2.0版本" -> ray, 20, 版, 本).

    Punctuation is deleted, not a separator ("U.S." -> "us"); see the module docstring for how
    this differs from the CMRC2018 script on non-Chinese text.
    """
    tokens: list[str] = []
    run: list[str] = []

    def flush() -> None:
        if run:
            tokens.append("".join(run))
            run.clear()

    for ch in text.lower():
        if _is_punct(ch):
            continue
        if _is_cjk(ch):
            flush()
            tokens.append(ch)
        elif ch.isspace():
            flush()
        else:
            run.append(ch)
    flush()
    return tokens


def _longest_common_run(a: list[str], b: list[str]) -> int:
    """Length of the longest contiguous token run shared by a and b (O(len(a) * len(b)))."""
    best = 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, start=1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def cmrc_f1(prediction: str, references: list[str]) -> float:
    """CMRC2018-style F1, max over references.

    Precision and recall count the longest common *contiguous* token run (the CMRC2018 script's
    LCS), over `cmrc_tokens`: p = lcs / len(pred), r = lcs / len(ref), F1 = 2pr / (p + r).
    """
    if not references:
        raise ValueError("cmrc_f1 needs at least one reference answer")
    pred = cmrc_tokens(prediction)
    best = 0.0
    for ref in references:
        gold = cmrc_tokens(ref)
        lcs = _longest_common_run(pred, gold)
        if lcs:
            p, r = lcs / len(pred), lcs / len(gold)
            best = max(best, 2 * p * r / (p + r))
    return best


def cmrc_exact_match(prediction: str, references: list[str]) -> float:
    """CMRC2018-style EM: equal to *any* reference after `cmrc_tokens` normalization."""
    if not references:
        raise ValueError("cmrc_exact_match needs at least one reference answer")
    pred = cmrc_tokens(prediction)
    return float(bool(pred) and any(pred == cmrc_tokens(r) for r in references))


def origin_char_score(answer: str, context: str) -> float:
    """Share of the answer's characters (whitespace and punctuation ignored) found in the context.

    The character-level companion of `origin_score`: 1.0 for an answer quoted from the context,
    partial credit for an answer that paraphrases with some of its characters; 0.0 when empty.
    """
    chars = [ch for ch in answer if not ch.isspace() and not _is_punct(ch)]
    if not chars:
        return 0.0
    seen = set(context)
    return sum(ch in seen for ch in chars) / len(chars)


def clipped_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two matrices, clipped to [0, 1]."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    num = (a * b).sum(axis=1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    return np.clip(cos, 0.0, 1.0)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if values else float("nan")
