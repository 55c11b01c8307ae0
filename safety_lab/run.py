"""One run (docs/architecture.md): check the settings before anything loads, then run the task the config names.

`task=evaluate` trains the run's `method` on `dataset` and evaluates it beside the base, `task=fuse` fuses trained
stages at weight λ, `task=analyse` runs the mechanistic study (safety_lab/tasks/). Every trained thing comes from
the artifact store by recipe (`stages.py`), so re-running a finished experiment only evaluates.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
from hydra.utils import get_class
from omegaconf import DictConfig

from safety_lab.analysis.study import check_analysis
from safety_lab.config import check_values
from safety_lab.distributed import job_threads
from safety_lab.errors import SafetyLabError
from safety_lab.eval.during_training import check_settings
from safety_lab.methods import build_method
from safety_lab.onpolicy import check_datasets
from safety_lab.sources import checked_mix
from safety_lab.stages import Stages
from safety_lab.tasks import task_of
from safety_lab.tasks.results import Evaluation

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> Path | None:
    """The run folder holding `metrics.json` (None on ranks > 0 of a multi-process run)."""
    check_values(cfg)
    check_datasets(cfg)  # every on-policy dataset's args
    checked_mix(cfg.dataset)
    task = task_of(cfg)
    torch.set_num_threads(job_threads(cfg))
    log.info("%d intra-op threads", torch.get_num_threads())
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        inspect.signature(get_class(cfg.trainer._target_)).bind(
            **{k: v for k, v in cfg.trainer.items() if k != "_target_"}, **cfg.strategy
        )
    except TypeError as e:
        raise SafetyLabError(f"trainer / strategy: {e} (of {cfg.trainer._target_})") from e
    stages = Stages(cfg)
    evaluation = Evaluation(cfg, stages.world, stages.template)
    check_settings(cfg.eval, evaluation.judge.labels)  # eval.during_training
    if cfg.get("analysis"):
        check_analysis(cfg.analysis, evaluation.suites)
    if cfg.method.name != "none":
        build_method(cfg.method.name).check(cfg.method)
    if cfg.get("align"):  # the align stage's method too; its messages name `method.<key>`, so they get the stage
        try:
            build_method(cfg.align.method.name).check(cfg.align.method)
        except SafetyLabError as e:
            raise SafetyLabError(f"align.{e}" if str(e).startswith("method") else f"align: {e}") from None
    return task(cfg, stages, evaluation, out)
