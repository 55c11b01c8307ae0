"""Fusion through the real CLI (`+debug=fast`, tiny data): the in-process λ sweep gives the same per-λ results as
a multirun over `fusion.weight`, reuses the trained inputs, and a multirun with an invalid λ completes the other
jobs, exits non-zero and reports the failed one; its jobs log to one W&B group (offline) with λ in the config."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from helpers import REPO, run_safety_lab

FAST = [
    "+experiment=lora_fusion",
    "+debug=fast",
    "align.dataset.n=64",
    "fusion.inputs.task.dataset.n=64",
    "fusion.inputs.safety.dataset.n=64",
]


def cli(*args: str, store, root=REPO) -> subprocess.CompletedProcess:
    return run_safety_lab(*args, *FAST, store=store, root=root, env={"WANDB_API_KEY": "", "WANDB_MODE": "offline"})


def sweep_dir(root: Path) -> Path:
    """The multirun's folder, where the default `hydra.sweep.dir` puts it under SAFETY_LAB_ROOT."""
    [folder] = (root / "outputs" / "multirun" / "lora_fusion").iterdir()
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    sweep = cli("fusion.weights=[0,0.3]", f"hydra.run.dir={root}/sweep", store=root / "store")
    multirun = cli("-m", "fusion.weight=0,1.5,0.3", "logger=wandb", store=root / "store", root=root)
    return root, sweep, multirun


def fused(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if "." not in k.split("/")[0]}


def test_in_process_sweep_equals_the_multirun(runs):
    root, sweep, multirun = runs
    assert sweep.returncode == 0, sweep.stderr[-3000:]
    assert sweep.stderr.count("training adapter") == 3  # align, task, safety: trained once
    assert "training" not in multirun.stderr.replace("training_", "")  # every job reuses them
    for weight, job in (("0", 0), ("0.3", 2)):
        ours = json.loads((root / "sweep" / f"weight={weight}" / "metrics.json").read_text())
        theirs = json.loads((sweep_dir(root) / str(job) / "metrics.json").read_text())
        assert ours["fusion/weight"] == float(weight) and "harmful_obey/compliance_rate" in ours
        assert fused(ours) == fused(theirs)
    assert (root / "sweep" / "report.md").exists()


def test_multirun_with_a_failed_job_completes_the_others(runs):
    root, _, multirun = runs
    assert multirun.returncode == 1
    assert "1 of 3 jobs failed" in multirun.stderr and "fusion.weight" in multirun.stderr
    failure = json.loads((sweep_dir(root) / "1" / "failed.json").read_text())
    assert "outside [0.0, 1.0]" in failure["error"]
    assert (sweep_dir(root) / "0" / "metrics.json").exists() and (sweep_dir(root) / "2" / "metrics.json").exists()
    report = (sweep_dir(root) / "report.md").read_text().splitlines()
    assert "**FAILED**" in report[3] and "1.5" in report[3] and "**FAILED**" not in report[2] + report[4]
    assert (sweep_dir(root) / "curves.png").exists() and (sweep_dir(root) / "pareto.png").exists()


def test_multirun_jobs_log_to_one_wandb_group_with_their_weight(runs):
    """The offline run file (protobuf records; this wandb has no reader for it) holds the group and the config as
    JSON: each job's run carries its own λ."""
    root, _, _ = runs
    for job, weight in ((0, 0.0), (2, 0.3)):
        [record] = (sweep_dir(root) / str(job) / "wandb").glob("offline-run-*/run-*.wandb")
        data = record.read_bytes()
        assert f'{{"merge":"lora_weighted","weight":{weight},'.encode() in data
        assert b"lora_fusion" in data and f"fused_{weight:g}".encode() in data  # group and run name
