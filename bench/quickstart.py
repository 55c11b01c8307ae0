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


def timed_run(store: str, run_dir: str) -> float:
    env = {**os.environ, "SAFETY_LAB_STORE": store}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "safety_lab", "+experiment=quickstart", f"hydra.run.dir={run_dir}",
                    "trainer.enable_progress_bar=false"], cwd=REPO, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        cold = timed_run(f"{tmp}/store", f"{tmp}/cold")
        warm = timed_run(f"{tmp}/store", f"{tmp}/warm")
    record("quickstart wall time: warm (store reused) vs cold (empty store)", warm, cold, "s", None, False,
           "python -m bench.quickstart", "cold includes pretraining the base; setup (make install) excluded")


if __name__ == "__main__":
    main()
