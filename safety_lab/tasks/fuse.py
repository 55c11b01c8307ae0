"""`task=fuse`: trained stages merged into the model at weight λ, each λ evaluated (`fusion=<merge>`, conf/fusion/).

The inputs (`fusion.inputs.<role>: {method, dataset, weight}`) are stages trained on the (aligned) base by recipe,
so every job of a λ sweep reuses them. The base and the run's method are evaluated first (`task=evaluate`'s
columns); then `FusedModel` writes W = W0 + merge(inputs, λ) into the method's model (or the base) for each λ,
never reloading it, and the fused model is evaluated as the column `fused`: `metrics.json` holds it unprefixed with
`fusion/weight`, in the run folder for one λ (`fusion.weight`), or in `weight=<λ>/` subfolders plus a sweep report
for a list (`fusion.weights`).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from safety_lab.config import plain
from safety_lab.distributed import is_rank_zero
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import results_table
from safety_lab.fusion.apply import FusedModel, stage_input
from safety_lab.fusion.merges import MERGES, FusionInput
from safety_lab.report import write_report
from safety_lab.stages import Model, Stages, merged
from safety_lab.tasks.evaluate import evaluate_stages
from safety_lab.tasks.results import Evaluation, log_results, write_results


def fusion_weights(fusion_cfg) -> list[float]:
    """The λ values a `fusion` config asks for (`weights`, else `weight`), each checked against its merge before
    any model loads; a SafetyLabError names the key, the value and what is allowed."""
    if fusion_cfg.merge not in MERGES:
        raise SafetyLabError(f"fusion.merge={fusion_cfg.merge!r} is not one of {sorted(MERGES)}")
    if fusion_cfg.weights:
        key, weights = "fusion.weights", list(fusion_cfg.weights)
    else:
        key, weights = "fusion.weight", [fusion_cfg.weight]
    for weight in weights:
        try:
            MERGES[fusion_cfg.merge].check(list(fusion_cfg.inputs), weight, dict(fusion_cfg.args))
        except ValueError as e:
            raise SafetyLabError(f"{key}: {e}") from None
    return weights


def fusion_inputs(stages: Stages, base: Model, stages_cfg) -> dict[str, FusionInput]:
    """Every stage of `stages_cfg` (role -> {method, dataset, weight}, e.g. `fusion.inputs`), trained on (or reused
    for) `base` by recipe, as a fusion input; `base.model` is left as it was."""
    inputs = {}
    for role, stage in stages_cfg.items():
        tuned = stages.apply(base, stage.method, stage.dataset)
        inputs[role] = stage_input(tuned.model, base.model, stage.get("weight", 1.0))
    return inputs


def fuse(cfg: DictConfig, stages: Stages, evaluation: Evaluation, out: Path) -> Path | None:
    weights = fusion_weights(cfg.fusion)
    base = stages.base()
    inputs = fusion_inputs(stages, base, cfg.fusion.inputs)
    columns, generations, tuned = evaluate_stages(cfg, stages, evaluation, base)
    if not is_rank_zero():
        return None
    target = merged(tuned.model) if tuned else base.model
    fused, table = FusedModel(target.cpu(), inputs, cfg.fusion.merge, plain(cfg.fusion.args)), dict(columns)
    for weight in weights:
        columns["fused"], rows = evaluation.assess(fused.set(weight), base.tokenizer, "fused")
        folder = out / f"weight={weight:g}" if cfg.fusion.weights else out
        metrics = write_results(folder, columns, generations + rows, main="fused", extra={"fusion/weight": weight})
        log_results(
            cfg, f"fused_{weight:g}", {**plain(cfg), "fusion": {**plain(cfg.fusion), "weight": weight}}, metrics
        )
        table[f"fused λ={weight:g}"] = columns["fused"]
    if cfg.fusion.weights:
        write_report(out)
    print(results_table(table))
    return out
