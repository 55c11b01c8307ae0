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


def job_command(local_rank: int) -> tuple[list[str], str]:
    """(command, cwd) that runs this Hydra job again as local rank `local_rank`, writing into the same folder."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    return [sys.executable, "-m", "safety_lab", *hydra.overrides.task, f'hydra.run.dir="{hydra.runtime.output_dir}"',
            "hydra.output_subdir=null", f"hydra.job.name=rank{local_rank}"], hydra.runtime.cwd


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
