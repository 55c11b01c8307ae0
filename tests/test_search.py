"""Searched trade-offs (safety_lab/search.py): the value a trial reports, the one-line errors of a search that
cannot work, and an Optuna sweep end to end on the synthetic world."""

from __future__ import annotations

import pytest
import yaml
from helpers import run_safety_lab
from omegaconf import OmegaConf

from safety_lab.errors import SafetyLabError
from safety_lab.search import check_search, objective

METRICS = {"harm/compliance_rate": 0.2, "utility/accuracy": 0.9, "task/accuracy": 0.8}


@pytest.mark.parametrize(
    "direction, bounds, expected",
    [
        ("minimize", {}, 0.2),
        ("minimize", {"utility/accuracy": 0.85}, 0.2),  # bound kept: the metric itself
        ("minimize", {"utility/accuracy": 0.95}, 1.05),  # missed by 0.05: worse than any feasible trial
        ("minimize", {"utility/accuracy": 0.95, "task/accuracy": 0.9}, 1.15),  # shortfalls add up
        ("maximize", {"task/accuracy": 0.7}, 0.2),
        ("maximize", {"task/accuracy": 0.9}, -0.1),
    ],
)
def test_the_trial_value_is_the_metric_inside_the_bounds_and_worse_than_any_outside(direction, bounds, expected):
    search = OmegaConf.create({"metric": "harm/compliance_rate", "direction": direction, "bounds": bounds})
    assert objective(METRICS, search) == pytest.approx(expected)


@pytest.mark.parametrize(
    "search, message",
    [
        (
            {"metric": "harm/compliance_rate", "direction": "up"},
            "search.direction='up' is not one of minimize, maximize",
        ),
        (
            {"metric": "harmfull/compliance_rate", "direction": "minimize"},
            "search.metric: 'harmfull/compliance_rate' is "
            "not a metric of an evaluated suite (<suite>/<metric>, suites: harm, utility)",
        ),
        (
            {"metric": "harm/compliance_rate", "direction": "minimize", "bounds": {"accuracy": 0.9}},
            "search.bounds.accuracy: 'accuracy' is not a metric of an evaluated suite",
        ),
    ],
)
def test_a_search_that_cannot_work_is_one_line(search, message):
    with pytest.raises(SafetyLabError) as info:
        check_search(OmegaConf.create(search), {"harm": {}, "utility": {}})
    assert str(info.value).startswith(message)


def test_cli_refuses_an_unknown_metric_before_any_trial(tmp_path):
    result = run_safety_lab(
        "-m",
        "+experiment=search_fusion",
        "search.metric=harmfull/compliance_rate",
        store=tmp_path / "store",
        root=tmp_path,
    )
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith("error: search.metric: 'harmfull/compliance_rate' is not a metric of an evaluated suite")
    )
    assert not (tmp_path / "store").exists()


@pytest.mark.slow  # a persona base, an align stage and two fused evaluations: about a minute
def test_an_optuna_search_optimises_the_runs_metric(tmp_path):
    result = run_safety_lab(
        "-m",
        "+experiment=search_fusion",
        "+debug=fast",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.sampler.n_startup_trials=2",
        store=tmp_path / "store",
        root=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = yaml.safe_load(next(tmp_path.rglob("optimization_results.yaml")).read_text())
    trials = [yaml.safe_load(p.read_text()) for p in tmp_path.rglob("metrics.json")]
    assert len(trials) == 2 and 0 <= found["best_params"]["fusion.weight"] <= 1
    assert found["best_value"] == pytest.approx(
        min(
            t["harmful_obey/compliance_rate"] if t["utility/accuracy"] >= 0.927 else 1 + 0.927 - t["utility/accuracy"]
            for t in trials
        )
    )
