"""The sweep report on fabricated multirun folders: table contents, the failed job's row, the plots, the
aggregation over seeds (numbers computed by hand), and the one-line errors on bad input."""

from __future__ import annotations

import csv
import json
import logging
import re
import subprocess
import sys

import pytest
import yaml
from helpers import REPO
from omegaconf import OmegaConf

from safety_lab.report import (
    PANELS,
    SweepReport,
    _points,
    aggregate,
    collect,
    main,
    seed_groups,
    summarize,
    write_report,
)


def fabricate(root, weights=(0.0, 0.5, 1.0), failed_weight=1.5):
    """A multirun folder shaped like Hydra's: job folders 0..n with .hydra/overrides.yaml and metrics.json, one
    with failed.json instead."""
    for job, weight in enumerate([*weights, failed_weight]):
        folder = root / str(job)
        (folder / ".hydra").mkdir(parents=True)
        (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"fusion.weight={weight}"]))
        if weight == failed_weight:
            (folder / "failed.json").write_text(json.dumps({"error": "SafetyLabError: fusion.weight: outside"}))
            continue
        harm, use = 0.9 * (1 - weight), 0.95 - 0.1 * weight
        metrics = {
            "fusion/weight": weight,
            "harmful/compliance_rate": harm,
            "utility/accuracy": use,
            "borderline/refusal_rate": weight / 2,
            "harmful/n": 100,
            "base.harmful/compliance_rate": 0.1,
        }
        for key, value in [("harmful/compliance_rate", harm), ("utility/accuracy", use)]:
            metrics |= {f"{key}_ci_low": value - 0.05, f"{key}_ci_high": value + 0.05}
        (folder / "metrics.json").write_text(json.dumps(metrics))


def test_report_tables_and_plots(tmp_path):
    fabricate(tmp_path)
    rows = write_report(tmp_path)
    assert [r["job"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "FAILED"]
    assert rows[3]["fusion/weight"] == 1.5 and "outside" in rows[3]["error"]

    with open(tmp_path / "report.csv") as f:
        table = list(csv.DictReader(f))
    assert float(table[1]["harmful/compliance_rate"]) == 0.45 and float(table[2]["utility/accuracy"]) == 0.85
    assert float(table[0]["harmful/compliance_rate_ci_low"]) == 0.9 - 0.05
    assert table[3]["status"] == "FAILED" and table[3]["harmful/compliance_rate"] == ""
    assert float(table[1]["base.harmful/compliance_rate"]) == 0.1

    md = (tmp_path / "report.md").read_text().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header[:4] == ["job", "status", "λ", "overrides"] and "harmful/compliance_rate" in header
    assert "harmful/n" not in header and not any(h.endswith("_ci_low") for h in header)
    cells = [c.strip() for c in md[3].strip("|").split("|")]
    assert cells[2] == "0.5" and cells[header.index("harmful/compliance_rate")] == "0.450 [0.40, 0.50]"
    assert "**FAILED**" in md[5] and "1.5" in md[5]
    assert "base.harmful/compliance_rate" not in header  # equal in every job: stated once below the table
    assert md[-1] == "Same in every successful job: base.harmful/compliance_rate 0.100."

    for png in ("curves.png", "pareto.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_in_process_sweep_folders_are_rows_and_the_cli_reports(tmp_path, capsys):
    for weight in (0.0, 0.2):
        folder = tmp_path / f"weight={weight:g}"
        folder.mkdir()
        metrics = {"fusion/weight": weight, "harmful/compliance_rate": 0.5 - weight}
        (folder / "metrics.json").write_text(json.dumps(metrics))
    (tmp_path / ".hydra").mkdir()  # the one run's overrides, which every λ folder shares
    (tmp_path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["fusion.weights=[0,0.2]"]))
    assert [r["job"] for r in collect(tmp_path)] == ["weight=0", "weight=0.2"]
    assert main([str(tmp_path)]) == 0
    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0] == "| job | status | λ | harmful/compliance_rate |"  # no column repeating the one command
    assert md[-1] == "Every job: `fusion.weights=[0,0.2]`."
    assert main([str(tmp_path / "missing")]) == 2


def test_plots_take_wilson_bounds_a_rounding_error_inside_the_value(tmp_path):
    """wilson_interval(30, 30) has the upper bound 1 − 1e-16 < 1: the error bar must not go negative."""
    from safety_lab.eval.metrics import wilson_interval

    low, high = wilson_interval(30, 30)
    assert high < 1.0
    for weight in (0.0, 1.0):
        folder = tmp_path / f"weight={weight:g}"
        folder.mkdir()
        (folder / "metrics.json").write_text(
            json.dumps(
                {
                    "fusion/weight": weight,
                    "harmful/compliance_rate": 1.0,
                    "harmful/compliance_rate_ci_low": low,
                    "harmful/compliance_rate_ci_high": high,
                }
            )
        )
    write_report(tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def job(root, name, overrides, metrics=None, failed=None):
    """A job folder with its .hydra/overrides.yaml and metrics.json (or failed.json)."""
    folder = root / name
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (folder / "metrics.json").write_text(json.dumps(metrics))
    if failed is not None:
        (folder / "failed.json").write_text(json.dumps({"error": failed}))
    return folder


def test_aggregate_by_hand():
    stats = aggregate([0.1, 0.2, 0.6])  # mean 0.3; squared deviations .04 + .01 + .09 = .14, / 2 → √.07
    assert stats == {"n": 3, "mean": pytest.approx(0.3), "std": pytest.approx(0.2645751), "min": 0.1, "max": 0.6}
    assert aggregate([0.45]) == {"n": 1, "mean": 0.45, "std": None, "min": 0.45, "max": 0.45}  # one seed: no std


def test_seeds_of_a_multirun_are_aggregated(tmp_path):
    """`fusion.weight=0,1 seed=1,2,3`, the job λ=1 seed=3 failed: means over 3 and 2 seeds."""
    harm = {0: [0.1, 0.2, 0.6], 1: [0.2, 0.4]}
    refusal = {0: [0.0, 0.0, 0.3], 1: [0.2, 0.2]}
    utility = {0: [0.9, 0.8, 0.7], 1: [0.5, 0.6]}
    for number, (weight, seed) in enumerate((w, s) for w in (0, 1) for s in (1, 2, 3)):
        overrides = [f"fusion.weight={weight}", f"seed={seed}"]
        if seed > len(harm[weight]):
            job(tmp_path, str(number), overrides, failed="RuntimeError: out of memory")
            continue
        h = harm[weight][seed - 1]
        job(
            tmp_path,
            str(number),
            overrides,
            {
                "fusion/weight": float(weight),
                "harmful/compliance_rate": h,
                "harmful/compliance_rate_ci_low": h / 2,
                "harmful/compliance_rate_ci_high": h * 2,
                "harmful/n": 10,
                "borderline/refusal_rate": refusal[weight][seed - 1],
                "utility/accuracy": utility[weight][seed - 1],
            },
        )
    rows = write_report(tmp_path)
    assert len(rows) == 6 and rows[5]["status"] == "FAILED" and rows[5]["fusion/weight"] == 1.0

    md = (tmp_path / "report.md").read_text().splitlines()
    assert md[0].startswith("| job | status | λ | overrides |") and md[7].startswith("| 5 | **FAILED**")  # per job
    assert md[-6].startswith("Over seeds (jobs that differ only by `seed=`): mean ± sample standard deviation")
    assert md[-4:] == [
        "| λ | overrides | jobs | harmful/compliance_rate | borderline/refusal_rate | utility/accuracy |",
        "|---|---|---|---|---|---|",
        # refusal λ=0: mean 0.1, squared deviations .01 + .01 + .04 = .06, / 2 → √.03 = 0.1732
        "| 0 | `fusion.weight=0` | 3 | 0.300 ± 0.265 [0.100, 0.600] (n=3) | 0.100 ± 0.173 [0.000, 0.300] (n=3) "
        "| 0.800 ± 0.100 [0.700, 0.900] (n=3) |",
        # harm λ=1: mean 0.3, √((.01 + .01) / 1) = 0.1414; utility λ=1: mean 0.55, √(.005) = 0.0707
        "| 1 | `fusion.weight=1` | failed 1 of 3 | 0.300 ± 0.141 [0.200, 0.400] (n=2) | 0.200 ± 0.000 [0.200, 0.200] "
        "(n=2) | 0.550 ± 0.071 [0.500, 0.600] (n=2) |",
    ]

    with open(tmp_path / "report_seeds.csv") as f:
        table = {(float(r["fusion/weight"]), r["metric"]): r for r in csv.DictReader(f)}
    assert {metric for _, metric in table} == {
        "harmful/compliance_rate",
        "harmful/n",
        "borderline/refusal_rate",
        "utility/accuracy",
    }  # interval bounds are not aggregated
    h0, h1 = table[0.0, "harmful/compliance_rate"], table[1.0, "harmful/compliance_rate"]
    assert (h0["overrides"], h0["jobs"], h0["failed"], h0["n"]) == ("fusion.weight=0", "3", "0", "3")
    assert float(h0["mean"]) == pytest.approx(0.3) and float(h0["std"]) == pytest.approx(0.2646, abs=5e-5)
    assert (float(h0["min"]), float(h0["max"])) == (0.1, 0.6)
    assert (h1["jobs"], h1["failed"], h1["n"]) == ("3", "1", "2")  # the failed seed: counted, not averaged
    assert float(h1["mean"]) == pytest.approx(0.3) and float(h1["std"]) == pytest.approx(0.1414, abs=5e-5)
    assert float(table[1.0, "utility/accuracy"]["std"]) == pytest.approx(0.0707, abs=5e-5)

    points, xlabel = _points(rows, summarize(seed_groups(rows), ["harmful/compliance_rate"]))
    assert xlabel == "λ (fusion.weight)" and [x for x, _ in points] == [0.0, 1.0]  # the plots draw the means:
    assert points[0][1]["harmful/compliance_rate"] == pytest.approx((0.3, 0.1, 0.6, 0.2645751))  # mean, band, std
    for png in ("curves.png", "pareto.png"):
        data = (tmp_path / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert not list(tmp_path.glob(".*.tmp"))


def test_seeds_of_in_process_sweeps_group_by_weight(tmp_path):
    """`fusion.weights=[0,0.5] seed=0,1`: λ folders under each seed's job; seed 1 failed before any λ, so it counts
    as failed in both λ groups, each left with one seed (std —, blank in the csv)."""
    sweep = ["fusion.weights=[0,0.5]"]
    for weight, harm in ((0, 0.45), (0.5, 0.25)):
        folder = job(tmp_path, "0", [*sweep, "seed=0"]) if weight == 0 else tmp_path / "0"
        (folder / f"weight={weight:g}").mkdir()
        (folder / f"weight={weight:g}" / "metrics.json").write_text(
            json.dumps({"fusion/weight": weight, "harmful/compliance_rate": harm})
        )
    job(tmp_path, "1", [*sweep, "seed=1"], failed="SafetyLabError: no data")
    groups = seed_groups(collect(tmp_path))
    assert {key: [r["job"] for r in rows] for key, rows in groups.items()} == {
        ("fusion.weights=[0,0.5]", 0): ["0/weight=0", "1"],
        ("fusion.weights=[0,0.5]", 0.5): ["0/weight=0.5", "1"],
    }
    write_report(tmp_path)
    assert (tmp_path / "report.md").read_text().splitlines()[-4:] == [
        "| λ | jobs | harmful/compliance_rate |",
        "|---|---|---|",
        "| 0 | failed 1 of 2 | 0.450 ± — [0.450, 0.450] (n=1) |",
        "| 0.5 | failed 1 of 2 | 0.250 ± — [0.250, 0.250] (n=1) |",
    ]
    with open(tmp_path / "report_seeds.csv") as f:
        assert [(r["fusion/weight"], r["n"], r["std"]) for r in csv.DictReader(f)] == [("0", "1", ""), ("0.5", "1", "")]


def test_single_seed_sweeps_have_no_seed_table(tmp_path):
    fabricate(tmp_path)
    write_report(tmp_path)
    assert "Over seeds" not in (tmp_path / "report.md").read_text() and not (tmp_path / "report_seeds.csv").exists()


def report_cli(folder) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "safety_lab.report", str(folder)], cwd=REPO, capture_output=True, text=True, timeout=120
    )


BAD = [
    ('{"harmful/compliance_rate": 0.5,', "invalid JSON (Expecting property name enclosed in double quotes"),
    ("[0.5]", "not a JSON object: [0.5]\n"),
    ('{"harmful/compliance_rate": "high"}', 'harmful/compliance_rate is "high", not a number\n'),
]


@pytest.mark.parametrize("content, problem", BAD, ids=["invalid", "not-an-object", "not-a-number"])
def test_bad_metrics_file_is_one_line_and_writes_nothing(tmp_path, content, problem):
    job(tmp_path, "0", ["seed=0"], {"harmful/compliance_rate": 0.5})
    (job(tmp_path, "1", ["seed=1"]) / "metrics.json").write_text(content)
    (tmp_path / "report.md").write_text("the previous report\n")
    result = report_cli(tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"error: report: {tmp_path / '1' / 'metrics.json'}: {problem}")
    assert result.stderr.count("\n") == 1
    assert (tmp_path / "report.md").read_text() == "the previous report\n"  # nothing (half-)written
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.md"]


def test_missing_folder_is_one_line(tmp_path):
    missing = tmp_path / "missing"
    result = report_cli(missing)
    assert (result.returncode, result.stderr) == (2, f"error: report: {missing} does not exist\n")


def test_the_multirun_callback_logs_a_bad_file_in_one_line(tmp_path, caplog, capsys):
    job(tmp_path, "0", ["seed=0"], {"harmful/compliance_rate": 0.5})
    (job(tmp_path, "1", ["seed=1"]) / "metrics.json").write_text("{")
    with caplog.at_level(logging.INFO, logger="safety_lab.report"), pytest.raises(SystemExit) as exit_:
        SweepReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert exit_.value.code == 1 and capsys.readouterr().out == f"{tmp_path}\n"
    [record] = caplog.records
    assert record.levelname == "ERROR" and record.exc_info is None and "\n" not in record.getMessage()
    assert record.getMessage().startswith(f"no report: report: {tmp_path / '1' / 'metrics.json'}: invalid JSON")
    assert not (tmp_path / "report.md").exists()


def test_plots_draw_the_standard_real_model_suites(tmp_path):
    keys = [
        "harmbench/compliance_rate",
        "donotanswer/compliance_rate",
        "jailbreak_dan/compliance_rate",
        "harmful_zh/compliance_rate",
        "over_refusal/refusal_rate",
        "borderline/refusal_rate",
        "utility_mc/acc",
        "utility/accuracy",
        "base.harmbench/compliance_rate",  # another column's: not drawn
        "harmbench/refusal_rate",
    ]
    taken = {title: [k for k in keys if re.fullmatch(pattern, k)] for title, pattern in PANELS}
    assert taken == {
        "harmfulness": keys[:4],
        "over-refusal": keys[4:6],
        "utility": keys[6:8],
    }
    for weight in (0.0, 0.5, 1.0):  # an in-process λ sweep on the standard suites: curves and Pareto front
        folder = tmp_path / f"weight={weight:g}"
        folder.mkdir()
        metrics = {
            "fusion/weight": weight,
            "harmbench/compliance_rate": 1 - weight,
            "utility_mc/acc": 0.5 + weight / 10,
        }
        (folder / "metrics.json").write_text(json.dumps(metrics | {"over_refusal/refusal_rate": weight / 2}))
    write_report(tmp_path)
    for png in ("curves.png", "pareto.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
