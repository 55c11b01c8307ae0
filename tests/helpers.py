"""Running the real command line from tests: `python -m safety_lab ...` in the repository, with a store of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_safety_lab(
    *args: str,
    store: Path | None,
    root: Path | None = None,
    env: dict | None = None,
    popen: bool = False,
    timeout: int = 900,
):
    """The finished process (or, with `popen`, the running one). `store` None: the configured default store;
    `root` sets SAFETY_LAB_ROOT, where multiruns write; W&B is silent; HYDRA_FULL_ERROR is unset, so errors come as
    the one line users see."""
    environment = {k: v for k, v in os.environ.items() if k not in ("HYDRA_FULL_ERROR", "SAFETY_LAB_STORE")}
    environment |= {"WANDB_SILENT": "true", **(env or {})}
    if store is not None:
        environment["SAFETY_LAB_STORE"] = str(store)
    if root is not None:
        environment["SAFETY_LAB_ROOT"] = str(root)
    command = [sys.executable, "-m", "safety_lab", *args]
    if popen:
        return subprocess.Popen(
            command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, cwd=REPO, env=environment, capture_output=True, text=True, timeout=timeout)


def fit_config(tmp_path: Path, accumulation: int = 1, checkpointing: bool = False, **top) -> dict:
    """The least config `Stages.fit` needs: a CPU Trainer, one process, a CSV logger and a store in `tmp_path`;
    `top` adds or replaces top-level keys (e.g. `ckpt_path`, `model`, `eval`)."""
    return {
        "trainer": {
            "_target_": "lightning.pytorch.Trainer",
            "accelerator": "cpu",
            "precision": "32-true",
            "gradient_clip_val": 1.0,
            "accumulate_grad_batches": accumulation,
            "enable_checkpointing": checkpointing,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "log_every_n_steps": 1,
        },
        "strategy": {"strategy": "auto", "devices": 1, "num_nodes": 1},
        "logger": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(tmp_path), "name": "logs"},
        "paths": {"output_dir": str(tmp_path), "artifacts": str(tmp_path / "store")},
        "model": {},
        "ckpt_path": None,
        "ckpt_every_n_steps": 1,
        **top,
    }


def entries(store: Path, kind: str) -> int:
    """How many entries of `kind` the artifact store holds (0 before the first is built)."""
    folder = store / kind
    return sum(p.is_dir() and not p.name.startswith(".") for p in folder.iterdir()) if folder.exists() else 0
