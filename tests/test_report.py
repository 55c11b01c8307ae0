"""The sweep report on a fabricated multirun folder: table contents, the failed job's row, the plots."""
from __future__ import annotations

import csv
import json

import yaml

from safety_lab.report import collect, main, write_report


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
        metrics = {"fusion/weight": weight, "harmful/compliance_rate": harm, "utility/accuracy": use,
                   "borderline/refusal_rate": weight / 2, "harmful/n": 100, "base.harmful/compliance_rate": 0.1}
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
        (folder / "metrics.json").write_text(json.dumps({
            "fusion/weight": weight, "harmful/compliance_rate": 1.0, "harmful/compliance_rate_ci_low": low,
            "harmful/compliance_rate_ci_high": high}))
    write_report(tmp_path)
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
