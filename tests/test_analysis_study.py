"""The mechanistic study: its findings logic on constructed numbers, and a smoke run of the whole experiment."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from safety_lab.analysis.study import findings

REPO = Path(__file__).resolve().parents[1]


def _space(silhouette: float, relative: dict[str, float]) -> dict:
    layer = {"silhouette": silhouette, "suites": {s: {"relative_l2": v} for s, v in relative.items()}}
    return {"layers": [layer, layer], "silhouette_mean": silhouette}


def test_findings_state_each_claim_as_a_check_on_the_numbers():
    cfg = OmegaConf.create({
        "unsafe_suite": "harmful", "jailbreak_suites": ["jb"],
        "models": {"sft_a": {"method": {"name": "sft", "lr": 1e-3}}, "sft_b": {"method": {"name": "sft", "lr": 1e-4}}}})
    results = {
        "activation_space": {"base": _space(0.1, {"harmful": 0.5, "jb": 0.5}),
                             "sft_a": _space(0.4, {"harmful": 0.6, "jb": 0.45}),
                             "sft_b": _space(0.05, {"harmful": 0.5, "jb": 0.55})},
        "row_space": {"sft_a": {"unsafe_over_safe": 1.8}, "sft_b": {"unsafe_over_safe": 0.9}},
        "column_space": {"sft_a": {"mean_sine": 0.3, "relative_change": 0.2},
                         "sft_b": {"mean_sine": 0.1, "relative_change": 0.05}},
        "jailbreak": {"base": {"jb": 1.0}, "sft_a": {"jb": 0.2}, "sft_b": {"jb": 0.6}},
    }
    checks = findings(results, cfg)
    assert checks["silhouette_up"]["sft_a"]["holds"] and not checks["silhouette_up"]["sft_b"]["holds"]
    assert checks["jailbreaks_closer_to_safe"]["sft_a"]["jb"]["holds"]
    assert not checks["jailbreaks_closer_to_safe"]["sft_b"]["jb"]["holds"]
    assert checks["row_space_carries_unsafe"]["sft_a"]["holds"] and not checks["row_space_carries_unsafe"]["sft_b"]["holds"]
    lr = checks["smaller_lr"]["sft"]
    assert lr["models"] == {"low": "sft_b", "high": "sft_a"}
    assert lr["changes_weights_less_holds"] and lr["easier_to_jailbreak_holds"]
    assert lr["jailbreak_compliance"] == {"low": 0.6, "high": 0.2}


@pytest.mark.slow
def test_mechanistic_experiment_smoke_run_writes_every_analysis(tmp_path):
    env = {**os.environ, "SAFETY_LAB_STORE": str(tmp_path / "store")}
    result = subprocess.run(
        [sys.executable, "-m", "safety_lab", "+experiment=mechanistic", "+debug=fast", "analysis.attack.steps=3",
         "analysis.attack.report_at=[1]", f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("activation_space", "column_space", "row_space", "lipschitz", "soft_tokens", "refusal_direction",
                 "jailbreak"):
        assert (run / f"{name}.json").exists() and (run / f"{name}.png").exists(), name
    tags = {"base", "sft_high", "sft_low", "dpo_high", "dpo_low", "unlearn_high", "unlearn_low"}
    space = json.loads((run / "activation_space.json").read_text())
    assert set(space) == tags and len(space["base"]["layers"]) == 3
    assert all(-1 <= layer["silhouette"] <= 1 and 0 <= layer["probe_accuracy"] <= 1
               for v in space.values() for layer in v["layers"])
    soft = json.loads((run / "soft_tokens.json").read_text())
    assert set(soft["base"]) == {"1", "2", "4"} and set(soft["base"]["1"]["success"]) == {"0", "1", "3"}
    checks = json.loads((run / "findings.json").read_text())
    assert set(checks["smaller_lr"]) == {"sft", "dpo", "unlearn"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"base.harmful/refusal_rate", "sft_low.jailbreak_competing/compliance_rate"} <= set(metrics)
