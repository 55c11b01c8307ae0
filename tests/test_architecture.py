"""The layering the architecture guide promises (docs/architecture.md): methods, fusion and analysis are given what
they use as arguments and import nothing of the run; a task runs only with the config it reads."""

from __future__ import annotations

import ast
import re

import pytest
from helpers import REPO
from omegaconf import OmegaConf
from test_config import compose_resolved

from safety_lab.errors import SafetyLabError
from safety_lab.methods import METHODS, build_method
from safety_lab.tasks import TASKS, task_of

PACKAGE = REPO / "safety_lab"


def imported_modules(path) -> set[str]:
    """Every module `path` imports (absolute names; `from . import x` resolved against its package)."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found |= {base} | {f"{base}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", ["methods", "fusion", "analysis"])
def test_methods_fusion_and_analysis_import_nothing_of_the_run(package):
    for path in sorted((PACKAGE / package).glob("*.py")):
        run_modules = {
            m
            for m in imported_modules(path)
            if m in ("safety_lab.run", "safety_lab.tasks") or m.startswith(("safety_lab.run.", "safety_lab.tasks."))
        }
        assert not run_modules, f"{path.relative_to(REPO)} imports {sorted(run_modules)}"


def test_fusion_and_analysis_do_not_train_stages():
    """Fusion stays tensor functions and analysis stays analyses: the tasks hand them trained models."""
    for package in ("fusion", "analysis"):
        for path in sorted((PACKAGE / package).glob("*.py")):
            assert "safety_lab.stages" not in imported_modules(path), path.relative_to(REPO)


@pytest.mark.parametrize("part", ["methods", "fusion", "analysis", "tasks", "stages.py", "run.py", "config.py"])
def test_no_module_imports_another_modules_private_names(part):
    for path in sorted((PACKAGE / part).glob("*.py")) if (PACKAGE / part).is_dir() else [PACKAGE / part]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("safety_lab"):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                assert not private, f"{path.relative_to(REPO)} imports {private} from {node.module}"


def test_every_method_config_names_a_registered_method_and_back(tmp_path):
    """A method is its module (registered with @method) plus its YAML: each YAML's name is registered, and each
    registered method has its YAML."""
    names = {}
    for path in sorted((REPO / "conf" / "method").glob("*.yaml")):
        names[path.stem] = compose_resolved([f"method={path.stem}"], tmp_path)["method"]["name"]
    assert all(name == "none" or build_method(name).name == name for name in names.values())
    assert set(METHODS) == set(names.values()) - {"none"} and all(stem == name for stem, name in names.items())


def task_config(tmp_path, *overrides: str):
    return OmegaConf.create(compose_resolved(list(overrides), tmp_path))


@pytest.mark.parametrize(
    "overrides, task",
    [
        ([], "evaluate"),
        (["+experiment=quickstart"], "evaluate"),
        (["+experiment=realign"], "evaluate"),
        (["+experiment=lora_fusion"], "fuse"),
        (["+experiment=lora_fusion", "fusion=ties"], "fuse"),
        (["+experiment=mechanistic"], "analyse"),
        (["task=fuse", "fusion=lora_weighted"], "fuse"),
    ],
)
def test_each_experiment_selects_its_task(overrides, task, tmp_path):
    assert task_of(task_config(tmp_path, *overrides)) is TASKS[task]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["fusion=lora_weighted"],
            "`fusion` is set, but only task=fuse runs it and this is task=evaluate: add "
            "task=fuse (or leave `fusion` out)",
        ),
        (["task=fuse"], "task=fuse needs `fusion`: fusion=<merge> (conf/fusion/), e.g. fusion=lora_weighted"),
        (["+analysis=mechanistic"], "`analysis` is set, but only task=analyse runs it and this is task=evaluate"),
        (["task=analyse"], "task=analyse needs `analysis`: +analysis=<study> (conf/analysis/)"),
        (["+experiment=mechanistic", "task=evaluate"], "only task=analyse runs it and this is task=evaluate"),
        (["+experiment=lora_fusion", "task=analyse"], "only task=fuse runs it and this is task=analyse"),
    ],
)
def test_a_fusion_or_analysis_the_task_would_not_run_is_an_error(overrides, message, tmp_path):
    with pytest.raises(SafetyLabError, match=re.escape(message)):
        task_of(task_config(tmp_path, *overrides))
