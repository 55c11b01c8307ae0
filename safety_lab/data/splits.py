"""Deterministic train / eval splits of prompt sets, so that a study never trains on a prompt it evaluates.

A prompt's `fingerprint` is the SHA-256 of its normalised text (Unicode NFKC, case-folded, whitespace collapsed),
so two copies that differ only in case or spacing are one prompt. A prompt belongs to the eval split when
sha256("<seed>:<fingerprint>"), read as a number in [0, 1), is below `eval_fraction`; the split therefore depends
on nothing but the text, the seed and the fraction: not on file order, not on which other prompts are present.
Every source split with the same seed and fraction puts a prompt on the same side, so a jailbreak suite that wraps
the eval side of a source's behaviours holds out exactly what that source's eval suite holds out. `key` names the
field to split on when a file's prompt field is not `prompt` (AdvBench's `goal`).
"""

from __future__ import annotations

import hashlib
import unicodedata

from safety_lab.data.io import DataError

SEED = 0
EVAL_FRACTION = 0.5
PARTS = ("train", "eval")


def normalise(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def fingerprint(text: str) -> str:
    return hashlib.sha256(normalise(text).encode()).hexdigest()


def in_eval(text: str, eval_fraction: float = EVAL_FRACTION, seed: int = SEED) -> bool:
    digest = hashlib.sha256(f"{seed}:{fingerprint(text)}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < eval_fraction


def holdout(
    rows: list[dict],
    part: str,
    eval_fraction: float = EVAL_FRACTION,
    seed: int = SEED,
    key: str = "prompt",
    source: str = "dataset",
) -> list[dict]:
    """The rows of one part (`train` or `eval`), split on the text in field `key`, in their original order."""
    if part not in PARTS:
        raise DataError(f"{source}: holdout.part={part!r} must be one of {', '.join(PARTS)}")
    if not 0 <= eval_fraction <= 1:
        raise DataError(f"{source}: holdout.eval_fraction={eval_fraction} must be in [0, 1]")
    for i, row in enumerate(rows, 1):
        if not isinstance(row.get(key), str):
            raise DataError(f"{source}: row {i}: holdout splits on field {key!r}, which it lacks or is not a string")
    return [row for row in rows if in_eval(row[key], eval_fraction, seed) == (part == "eval")]
