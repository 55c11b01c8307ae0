"""One task per kind of run, chosen by `task=` (conf/task/): `evaluate` a method, `fuse` trained stages at weight λ,
`analyse` models (the mechanistic study), `defend` against harmful fine-tuning (one cell of the grid). Each is
`task(cfg, stages, evaluation, out) -> run folder` (None on ranks > 0) and reads top to bottom; run.py checks the
settings and calls the one the config names.
"""

from __future__ import annotations

from collections.abc import Callable

from omegaconf import DictConfig

from safety_lab.errors import SafetyLabError
from safety_lab.tasks.analyse import analyse
from safety_lab.tasks.defend import defend
from safety_lab.tasks.evaluate import evaluate
from safety_lab.tasks.fuse import fuse

TASKS: dict[str, Callable] = {"evaluate": evaluate, "fuse": fuse, "analyse": analyse, "defend": defend}
# the config node only one task reads, and how a user adds it
NODES = {
    "fuse": ("fusion", "fusion=<merge> (conf/fusion/), e.g. fusion=lora_weighted"),
    "analyse": ("analysis", "+analysis=<study> (conf/analysis/), e.g. +analysis=mechanistic"),
    "defend": ("defense", "+experiment=hft_grid defense=<name> attack=<name> (conf/defense/, conf/attack/)"),
}


def task_of(cfg: DictConfig) -> Callable:
    """The task `task.name` names; one SafetyLabError line when the config holds a `fusion` or an `analysis` that
    task would not run, or lacks the one it needs."""
    name = getattr(cfg.task.name, "value", cfg.task.name)
    for task, (node, how) in NODES.items():
        if cfg.get(node) and name != task:
            raise SafetyLabError(
                f"`{node}` is set, but only task={task} runs it and this is task={name}: "
                f"add task={task} (or leave `{node}` out)"
            )
        if name == task and not cfg.get(node):
            raise SafetyLabError(f"task={task} needs `{node}`: {how}")
    return TASKS[name]
