"""Wall time of `python -m safety_lab +experiment=quickstart`: cold (empty store: the base is pretrained) and warm
(base and adapter reused). Reported as warm against cold; no target, the foundation's bars are ≤ 6 min cold
including setup and ≤ 90 s warm."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import record

REPO = Path(__file__).resolve().parents[1]


def timed_run(store: str, run_dir: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in MiB) of one quickstart run in a child process."""
    env = {**os.environ, "SAFETY_LAB_STORE": store}
    with tempfile.TemporaryFile() as errors:
        start = time.perf_counter()
        child = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "safety_lab",
                "+experiment=quickstart",
                f"hydra.run.dir={run_dir}",
                "trainer.enable_progress_bar=false",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=errors,
        )
        _, status, usage = os.wait4(child.pid, 0)  # the child's own resource usage, peak RSS included (KiB)
        seconds = time.perf_counter() - start
        if os.waitstatus_to_exitcode(status):
            errors.seek(0)
            raise SystemExit(f"quickstart failed:\n{errors.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cold, cold_rss = timed_run(f"{tmp}/store", f"{tmp}/cold")
        warm, warm_rss = timed_run(f"{tmp}/store", f"{tmp}/warm")
    record(
        "quickstart wall time: warm (store reused) vs cold (empty store)",
        warm,
        cold,
        "s",
        None,
        False,
        "python -m bench.quickstart",
        "cold includes pretraining the base; setup (make install) excluded",
        rss=(warm_rss, cold_rss),
    )


if __name__ == "__main__":
    main()
