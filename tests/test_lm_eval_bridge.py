"""The lm-eval bridge on the in-memory model gives the same accuracy as lm-eval's own `simple_evaluate` loading the
same saved model from its folder, on a local (offline) multiple-choice task."""

from __future__ import annotations

from pathlib import Path

import pytest

from safety_lab.eval.lm_eval_bridge import flatten_results, lm_eval_utility
from safety_lab.models.factory import load_pretrained

FIX = Path(__file__).parent / "fixtures" / "lm_eval"


def test_flatten_results():
    results = {
        "copa": {"alias": "copa", "acc,none": 0.5, "acc_stderr,none": "N/A"},
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,flexible-extract": 0.5},
    }
    assert flatten_results(results) == {
        "copa/acc": 0.5,
        "gsm8k/exact_match_strict-match": 0.25,
        "gsm8k/exact_match_flexible-extract": 0.5,
    }


@pytest.fixture
def task_dir(tmp_path):
    text = (
        (FIX / "tiny_mc.yaml").read_text().replace("tests/fixtures/lm_eval/tiny_mc.jsonl", str(FIX / "tiny_mc.jsonl"))
    )
    (tmp_path / "tiny_mc.yaml").write_text(text)
    return str(tmp_path)


def test_bridge_accuracy_equals_lm_evals_own(tiny_hf_model, task_dir, monkeypatch):
    pytest.importorskip("lm_eval")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    model, tokenizer = load_pretrained(tiny_hf_model)
    ours = lm_eval_utility(model, tokenizer, ["tiny_mc"], include_path=task_dir, batch_size=4)
    theirs = simple_evaluate(
        model="hf",
        model_args=f"pretrained={tiny_hf_model},dtype=float32",
        tasks=["tiny_mc"],
        task_manager=TaskManager(include_path=task_dir, include_defaults=False),
        bootstrap_iters=0,
        log_samples=False,
        batch_size=4,
        device="cpu",
    )
    assert set(ours) == {"tiny_mc/acc"}
    assert ours["tiny_mc/acc"] == theirs["results"]["tiny_mc"]["acc,none"]
    assert round(ours["tiny_mc/acc"] * 6, 9) == round(ours["tiny_mc/acc"] * 6)  # a share of the 6 questions
