"""lm-evaluation-harness's `custom_dataset` for the `utility_mc` task: the questions in utility_mc.jsonl beside this
file, found from here rather than from the working directory."""

from __future__ import annotations

import json
from pathlib import Path

QUESTIONS = Path(__file__).with_name("utility_mc.jsonl")


def load(**_) -> dict:
    import datasets

    rows = [json.loads(line) for line in QUESTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}
