"""`make gpu-check` (bench/gpu_check.py) on the CPU: the one line without CUDA, and the dry run's rows, table and
reference file on the synthetic tiny model (the device rows themselves need a GPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bench.gpu_check import NO_CUDA, STUDIES, error_line, inside
from tests.helpers import REPO


def gpu_check(*args: str, cuda: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({} if cuda else {"CUDA_VISIBLE_DEVICES": ""})
    command = [sys.executable, "-m", "bench.gpu_check", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_without_cuda_it_prints_one_line_and_exits_0():
    done = gpu_check(cuda=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [NO_CUDA.format(torch.__version__)]


def test_the_dry_run_records_a_reference_and_tables_each_metric_against_it(tmp_path):
    reference, out = tmp_path / "reference.json", tmp_path / "runs"
    done = gpu_check(
        "--dry-run", "--rows=fusion", f"--record-reference={reference}", f"--reference={reference}", f"--out={out}"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    recorded = json.loads(reference.read_text())["fusion (dry run)"]
    assert "+experiment=lora_fusion" in recorded["command"] and "trainer.precision=32-true" in recorded["command"]
    lines = done.stdout.splitlines()
    for key in STUDIES["fusion"].dry_keys:  # e.g. weight=0/harmful_obey/compliance_rate
        folder, metric = key.split("/", 1)
        written = json.loads((out / "fusion" / "run" / folder / "metrics.json").read_text())
        value, low, high = (written[metric + end] for end in ("", "_ci_low", "_ci_high"))
        assert [recorded["metrics"][key + end] for end in ("", "_ci_low", "_ci_high")] == [value, low, high]
        cell = f"{value:.3f} [{low:.3f}, {high:.3f}]"
        line = next(line for line in lines if f" {key} " in line)
        assert line.split(key)[1].split() == [*cell.split(), *cell.split(), "yes"]  # this run, reference, in CI
    assert next(line for line in lines if line.startswith("fusion ")).split()[:2] == ["fusion", "ok"]


def test_a_failing_row_shows_its_error_and_gpu_rows_are_skipped_in_a_dry_run():
    done = gpu_check("--dry-run", "--rows=realign,fsdp1", "--set=no_such_key=1")
    assert done.returncode == 1
    rows = {line.split()[0]: line for line in done.stdout.splitlines()[-2:]}
    assert rows["realign"].split()[1] == "failed" and "Could not override 'no_such_key'" in rows["realign"]
    assert rows["fsdp1"].split() == ["fsdp1", "skipped", "-", "GPU", "only"]


def test_error_line_and_interval_check():
    traceback = (
        "[10:00:00 INFO safety_lab.run] 16 intra-op threads\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nValueError: inner\n\nThe above exception was the direct cause:\n'
        "torch.OutOfMemoryError: CUDA out of memory.\n\nSet the environment variable HYDRA_FULL_ERROR=1 for a "
        "complete stack trace.\n"
    )
    assert error_line(traceback) == "torch.OutOfMemoryError: CUDA out of memory."
    assert error_line("[log]\nerror: eval.n=0: must be >= 1\n") == "error: eval.n=0: must be >= 1"
    reference = {"a": 1.0, "a_ci_low": 0.886, "a_ci_high": 0.9999999999999998, "u": 0.2}
    assert [inside(v, reference, "a") for v in (1.0, 0.886, 0.885)] == ["yes", "yes", "NO"]
    assert inside(0.2, reference, "u") == inside(0.2, {}, "a") == "-"  # no interval to compare with
