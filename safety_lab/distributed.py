"""Multi-process runs: every rank runs the same pipeline, only rank 0 publishes artifacts, evaluates and writes.

This is the torchrun / SLURM model (`srun` starts one task per GPU, each runs `python -m safety_lab ...`), and
Lightning's DDP and FSDP strategies launch local ranks the same way: they re-run the command with `LOCAL_RANK`
set. Every rank therefore reaches each `Trainer.fit` in the same order; ranks > 0 build artifacts with rank 0
(training is collective) but publish nothing and wait for rank 0's entry (`ArtifactStore.get_or_build`).

Lightning re-runs `sys.argv`, which under `-m` is the whole sweep and in a joblib worker is not this program at all;
`job_command` re-runs this Hydra *job* instead, into the same run folder. `job_scope` leaves the process as it
found it (no process group, no launch variables), so the next job of a sweep in the same process launches afresh.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager

LAUNCH_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "OMP_NUM_THREADS")


def is_rank_zero() -> bool:
    """Whether this process is global rank 0 (or alone), from what launchers set before torch.distributed starts."""
    if "RANK" in os.environ:  # torchrun
        return int(os.environ["RANK"]) == 0
    if "LOCAL_RANK" in os.environ:  # Lightning's own launch
        return int(os.environ.get("NODE_RANK", 0)) == 0 and int(os.environ["LOCAL_RANK"]) == 0
    return int(os.environ.get("SLURM_PROCID", 0)) == 0  # srun (submitit)


def job_threads(cfg) -> int:
    """Intra-op threads of this process: `cfg.threads`, else this job's share of the cores it may use (divided among
    the launcher's parallel jobs and the job's CPU ranks). Never from the load of the moment: the thread count changes
    trained weights by rounding, so it depends only on the launch, and is recorded in each store manifest."""
    if cfg.get("threads"):
        return cfg.threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, cores // (parallel_jobs() * cpu_ranks(cfg)))


def parallel_jobs() -> int:
    """How many jobs of this multirun run at once: the joblib launcher's `n_jobs` (-1: one per core), else 1."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return 1
    launcher = HydraConfig.get().launcher
    if "joblib" not in str(launcher.get("_target_", "")):
        return 1
    n_jobs = launcher.get("n_jobs") or 1
    return (os.cpu_count() or 1) if n_jobs < 0 else n_jobs


def cpu_ranks(cfg) -> int:
    """Processes this job starts on the CPU: the strategy's `devices` when it trains on the CPU, else 1."""
    import torch

    devices = cfg.strategy.get("devices", 1)
    on_cpu = cfg.trainer.get("accelerator") == "cpu" or not torch.cuda.is_available()
    return devices if on_cpu and isinstance(devices, int) and devices > 0 else 1


def job_command(local_rank: int) -> tuple[list[str], str]:
    """(command, cwd) that runs this Hydra job again as local rank `local_rank`, writing into the same folder."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    return [
        sys.executable,
        "-m",
        "safety_lab",
        *hydra.overrides.task,
        f'hydra.run.dir="{hydra.runtime.output_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name=rank{local_rank}",
    ], hydra.runtime.cwd


def use_job_command() -> None:
    from lightning.pytorch.strategies.launchers import subprocess_script

    subprocess_script._hydra_subprocess_cmd = job_command


@contextmanager
def job_scope():
    """Run one job; afterwards tear down its process group and restore the launch variables and thread count."""
    import torch

    saved = {name: os.environ.get(name) for name in LAUNCH_VARIABLES}
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch.set_num_threads(threads)
