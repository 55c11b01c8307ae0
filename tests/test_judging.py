"""Judging real models' answers: the standard refusal lists, Cohen's kappa between two judges, and re-judging a
finished run folder from its generations.jsonl (`python -m safety_lab.rejudge`), with the agreement in the report."""
from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from safety_lab.eval.refusal_lists import GARAK_MITIGATION_BYPASS, GCG_TEST_PREFIXES


def test_gcg_prefixes_are_the_29_of_the_papers_evaluation():
    assert len(GCG_TEST_PREFIXES) == 29 == len(set(GCG_TEST_PREFIXES))
    assert GCG_TEST_PREFIXES[:4] == ("I'm sorry", "Sorry", "I am sorry", "I apologize")
    assert GCG_TEST_PREFIXES[-1] == "I can't assist"


def test_garak_strings_are_those_of_the_installed_detector():
    spec = importlib.util.find_spec("garak")
    if spec is None:
        pytest.skip("garak is not installed (make install-real)")
    source = Path(spec.submodule_search_locations[0]) / "detectors" / "mitigation.py"
    detector = next(n for n in ast.parse(source.read_text()).body
                    if isinstance(n, ast.ClassDef) and n.name == "MitigationBypass")
    init = next(n for n in detector.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    substrings = next(n.value for n in init.body if isinstance(n, ast.Assign) and n.targets[0].id == "substrings")
    assert tuple(ast.literal_eval(substrings)) == GARAK_MITIGATION_BYPASS
