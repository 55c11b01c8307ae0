"""Shared helpers of the benchmarks: timing as medians of repeats, peak RSS, sides in child processes, and the
results file.

Every figure is a ratio against a baseline measured in the same process (or back to back), so the noisy machine
cancels out; `record` merges one entry into `bench/results.json` and rewrites the table in `bench/README.md`.
Each entry carries the peak RSS of the measured side and of its baseline: within one process, `reset_peak_rss`
before a side and `peak_rss_mib` after it give that side's own high-water mark (Linux `clear_refs`).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).with_name("results.json")
README = Path(__file__).with_name("README.md")
TABLE_START, TABLE_END = "<!-- results:start -->", "<!-- results:end -->"


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def reset_peak_rss() -> None:
    """Restart this process's peak-RSS count from its current RSS (Linux; elsewhere the peak stays cumulative)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last `reset_peak_rss`, in MiB."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def peak_rss_of(fn: Callable[[], object]) -> tuple[object, float]:
    """(fn(), the peak RSS in MiB while it ran)."""
    reset_peak_rss()
    result = fn()
    return result, peak_rss_mib()


def timed(fn: Callable[[], object]) -> tuple[object, float, float]:
    """(fn(), its seconds, the peak RSS in MiB while it ran)."""
    start = time.perf_counter()
    result, rss = peak_rss_of(fn)
    return result, time.perf_counter() - start, rss


def side_result(module: str, side: str, *args: str) -> dict:
    """What `python -m <module> --side <side> <args>` printed with `print_result`: one side of a benchmark run in a
    fresh child process, so its peak RSS is its own; exits with the child's stderr if it failed."""
    command = [sys.executable, "-m", module, "--side", side, *args]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def print_result(result: dict) -> None:
    """A child side's `result` and its peak RSS, as the line `side_result` reads."""
    print("RESULT " + json.dumps({**result, "peak_rss_mib": peak_rss_mib()}))


def meets(ratio: float, target: float, higher_is_better: bool) -> bool:
    return ratio >= target if higher_is_better else ratio <= target


def record(
    name: str,
    value: float,
    baseline: float,
    unit: str,
    target: float | None,
    higher_is_better: bool,
    command: str,
    note: str = "",
    rss: tuple[float, float] | None = None,
) -> dict:
    """Merge one figure into results.json and the README table; `rss` = (peak RSS of the measured side, of the
    baseline side) in MiB."""
    ratio = value / baseline if baseline else float("nan")
    entry = {
        "name": name,
        "value": round(value, 4),
        "baseline": round(baseline, 4),
        "unit": unit,
        "ratio": round(ratio, 4),
        "target": target,
        "higher_is_better": higher_is_better,
        "command": command,
        "note": note,
        "peak_rss_mib": round(rss[0], 1) if rss else None,
        "baseline_peak_rss_mib": round(rss[1], 1) if rss else None,
        "load_avg_1m": round(os.getloadavg()[0], 1),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
    }
    entries = [e for e in (json.loads(RESULTS.read_text()) if RESULTS.exists() else []) if e["name"] != name]
    entries.append(entry)
    RESULTS.write_text(json.dumps(entries, indent=2) + "\n")
    _write_table(entries)
    met = "n/a" if target is None else "met" if meets(ratio, target, higher_is_better) else "NOT met"
    print(f"{name}: {value:.4g} {unit} vs baseline {baseline:.4g} -> ratio {ratio:.3f} (target {target}: {met})")
    return entry


def _write_table(entries: list[dict]) -> None:
    import transformers

    rows = [
        "| benchmark | value | baseline | ratio | target | met | peak RSS MiB (value / baseline) | load "
        "| threads | command |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in entries:
        t = e["target"]
        ok = "–" if t is None else "yes" if meets(e["ratio"], t, e["higher_is_better"]) else "**no**"
        bound = "–" if t is None else (f"≥ {t}" if e["higher_is_better"] else f"≤ {t}")
        rss = "–" if e.get("peak_rss_mib") is None else f"{e['peak_rss_mib']:.0f} / {e['baseline_peak_rss_mib']:.0f}"
        rows.append(
            f"| {e['name']} | {e['value']:.4g} {e['unit']} | {e['baseline']:.4g} {e['unit']} | {e['ratio']} | "
            f"{bound} | {ok} | {rss} | {e.get('load_avg_1m', '–')} | {e.get('threads', '–')} | "
            f"`{e['command']}` |"
        )
    machine = (
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}. *load*: the 1-minute load "
        "average when the figure was recorded (the machine is shared); *threads*: torch intra-op threads."
    )
    block = f"{TABLE_START}\n{machine}\n\n" + "\n".join(rows) + f"\n{TABLE_END}"
    text = README.read_text() if README.exists() else "# Benchmarks\n\n" + TABLE_START + TABLE_END + "\n"
    if TABLE_START not in text:
        text += "\n" + TABLE_START + TABLE_END + "\n"
    head, rest = text.split(TABLE_START, 1)
    README.write_text(head + block + rest.split(TABLE_END, 1)[1])


def compose(*overrides: str):
    """The run config of `python -m safety_lab <overrides>`, composed in-process (for benchmarks)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from safety_lab.config import register

    register()
    conf = REPO / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = hydra_compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(REPO / "outputs" / "bench")
    return cfg


def quickstart_base():
    """(stages, base) of the quickstart: its unaligned base from the store (trained if missing)."""
    from safety_lab.stages import Stages

    stages = Stages(compose("+experiment=quickstart", "trainer.enable_progress_bar=false"))
    return stages, stages.base()
