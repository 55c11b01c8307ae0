"""`task=analyse`: the mechanistic study (`+analysis=mechanistic`, analysis/study.py) as one run.

Each stage of `analysis.models` is trained from its own copy of the base through the store and merged; then the base
and every tuned model are evaluated on the run's suites and analysed, each analysis writing `<analysis>.json` and
`.png` into the run folder. Under DDP/FSDP every rank trains, only rank 0 analyses.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

from safety_lab.analysis.study import Study
from safety_lab.distributed import is_rank_zero
from safety_lab.stages import Model, Stages, merged
from safety_lab.tasks.results import Evaluation, finish


def analysis_models(stages: Stages, base: Model) -> dict[str, object]:
    """{"base": the base model, tag: the base with the stage applied (merged), …}."""
    models = {"base": base.model}
    for tag, stage in stages.cfg.analysis.models.items():
        tuned = stages.apply(replace(base, model=copy.deepcopy(base.model)), stage.method, stage.dataset)
        models[tag] = merged(tuned.model).eval()
    return models


def analyse(cfg: DictConfig, stages: Stages, evaluation: Evaluation, out: Path) -> Path | None:
    base = stages.base()
    study = Study(cfg.analysis, stages.template, base.tokenizer, evaluation.suites, out, seed=cfg.seed)
    models = analysis_models(stages, base)  # after the study checked its settings, before it analyses
    if not is_rank_zero():
        return None
    columns, generations = study.run(
        models, lambda model, tag, only=None: evaluation.assess(model, base.tokenizer, tag, only)
    )
    return finish(out, columns, generations, main=cfg.method.name)
