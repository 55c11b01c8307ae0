"""Speed on a shared machine: training beside one other busy process, and a 2-job parallel multirun.

1. Training of the default tiny model through the framework (`Stages.fit` + `SFTModule`, the thread count the
   framework picks for a lone job) in a child process, alone against beside one other single-threaded busy process
   (`while True: pass`), in alternating pairs; the figure is the ratio of the median steps/s (target ≥ 0.55).
2. `python -m safety_lab -m +experiment=quickstart seed=1,2 hydra/launcher=joblib` (two jobs at once, each with its
   share of the cores) against the same two jobs one after the other (the basic launcher), each side on a store
   holding only the quickstart's base, so both sides train and evaluate the same two adapters; ratio of wall
   times (target ≤ 0.7).

    .venv/bin/python -m bench.contention [--pairs 3] [--steps 40]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import record

REPO = Path(__file__).resolve().parents[1]
TRAIN = """
import sys, time
import safety_lab  # first: its OpenMP settings must precede torch
from bench.train_step import framework_fit, setup
from safety_lab.distributed import job_threads
import torch
stages, model, data = setup({steps})
torch.set_num_threads(job_threads(stages.cfg))
framework_fit(stages, model, data)  # warm-up
start = time.perf_counter()
framework_fit(stages, model, data)
print({steps} / (time.perf_counter() - start))
"""
JOBS = ("+experiment=quickstart", "seed=1,2", "eval.n=100", "trainer.enable_progress_bar=false")


def steps_per_second(steps: int, busy: bool) -> float:
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, "-c", TRAIN.format(steps=steps)], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    return float(out.strip().splitlines()[-1])


def training_beside_a_busy_process(pairs: int, steps: int) -> None:
    alone, busy = [], []
    for i in range(pairs):
        for side in (False, True) if i % 2 == 0 else (True, False):
            (busy if side else alone).append(steps_per_second(steps, side))
    ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(alone, busy))
    record(
        "contention: training beside one busy process vs alone",
        statistics.median(busy),
        statistics.median(alone),
        "steps/s",
        0.55,
        True,
        f"python -m bench.contention --pairs {pairs}",
        f"default tiny model, {steps} steps, framework's thread count, OMP_WAIT_POLICY=PASSIVE; "
        f"per-pair ratios {ratios}",
    )


def quickstart_base_entry() -> Path:
    """The quickstart base's store entry (pretrained into the default store if missing)."""
    from bench.common import quickstart_base

    stages, _ = quickstart_base()
    return stages.store.path("base", stages.recipe("base"))


def multirun_seconds(base: Path, parallel: bool, tmp: Path) -> float:
    store = tmp / ("parallel" if parallel else "sequential")
    shutil.copytree(base, store / "base" / base.name)
    launcher = ["hydra/launcher=joblib"] if parallel else []
    start = time.perf_counter()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "safety_lab",
            "-m",
            *JOBS,
            *launcher,
            f"paths.artifacts={store}",
            f"hydra.sweep.dir={tmp}/{store.name}-runs",
        ],
        cwd=REPO,
        capture_output=True,
        check=True,
    )
    return time.perf_counter() - start


def parallel_multirun(base: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sequential = multirun_seconds(base, False, Path(tmp))
        parallel = multirun_seconds(base, True, Path(tmp))
    record(
        "contention: 2-job joblib multirun vs the same jobs in sequence",
        parallel,
        sequential,
        "s",
        0.7,
        False,
        "python -m bench.contention",
        f"python -m safety_lab -m {' '.join(JOBS)} on a store holding the base",
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3, help="alternating (alone, busy) pairs")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of 128 rows per timing")
    a = parser.parse_args()
    training_beside_a_busy_process(a.pairs, a.steps)
    parallel_multirun(quickstart_base_entry())


if __name__ == "__main__":
    main()
