"""`task=evaluate` (the default): the base and the base with the run's `method` on `dataset`, evaluated side by side.

The base is evaluated as the column `base` (with `eval.base`, or when there is no method), the tuned model as the
column named by the method; `metrics.json` holds the method's column unprefixed.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from safety_lab.stages import Model, Stages
from safety_lab.tasks.results import Evaluation, finish


def evaluate_stages(
    cfg: DictConfig, stages: Stages, evaluation: Evaluation, base: Model
) -> tuple[dict, list, Model | None]:
    """(metrics per column, generation rows, the tuned model or None without a method) of `base` and `method`."""
    columns, generations, tuned = {}, [], None
    if cfg.eval.base or cfg.method.name == "none":
        columns["base"], rows = evaluation.assess(base.model, base.tokenizer, "base")
        generations += rows
    if cfg.method.name != "none":
        base.model.cpu()  # stages train on the CPU copy; evaluation moves models to the device
        tuned = stages.apply(base, cfg.method, cfg.dataset)
        columns[cfg.method.name], rows = evaluation.assess(tuned.model, tuned.tokenizer, cfg.method.name)
        generations += rows
    return columns, generations, tuned


def evaluate(cfg: DictConfig, stages: Stages, evaluation: Evaluation, out: Path) -> Path | None:
    columns, generations, _ = evaluate_stages(cfg, stages, evaluation, stages.base())
    return finish(out, columns, generations, main=cfg.method.name)
