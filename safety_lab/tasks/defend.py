"""`task=defend`: one cell of the harmful fine-tuning grid (`+experiment=hft_grid`), a defense against an attack.

The attack (`attack`, conf/attack/) is the user's fine-tune, `method` on `dataset`, or none. The defense (`defense`,
conf/defense/) acts on one stage:
- `align`: its `method` on its `dataset` is the alignment stage, instead of the run's `align`;
- `finetune`: the fine-tune runs its `method` (if set) instead of the attack's, its `dataset` settings (e.g. `mix`)
  merged into the attack's data;
- `post`: the fine-tuned model is repaired, by a merge (`fusion`) or a method (`method` on `dataset`); its config
  wires the attack's stage where the merge or the method takes it (`${attack.method}`, `${attack.dataset}`).
Every stage is a store recipe, so a multirun over attack × defense × seed trains each once. The cell's model is
evaluated on the attack's suites (harmful score, the task's accuracy, over-refusal), unprefixed in metrics.json; the
sweep report draws the grid (report.py).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from safety_lab.config import DatasetConfig, plain
from safety_lab.errors import SafetyLabError
from safety_lab.fusion.apply import FusedModel
from safety_lab.methods import build_method
from safety_lab.sources import checked_mix
from safety_lab.stages import Stages
from safety_lab.tasks.fuse import fusion_inputs, fusion_weights
from safety_lab.tasks.results import Evaluation, finish


def finetune_stage(cfg: DictConfig) -> tuple | None:
    """The user's fine-tune (method, dataset), with a fine-tuning-stage defense applied; None without one."""
    attack, defense = cfg.attack, cfg.defense
    if attack.method is None:
        return None
    if defense.stage != "finetune":
        return attack.method, attack.dataset
    dataset = OmegaConf.merge(OmegaConf.structured(DatasetConfig), plain(attack.dataset), plain(defense.dataset) or {})
    return defense.method or attack.method, dataset


NEEDS = {  # what a defense of each stage must set
    "align": "defense.method and defense.dataset (the alignment stage)",
    "finetune": "defense.method or defense.dataset (the fine-tune's method, or settings of its data)",
    "post": "either defense.fusion (a merge) or defense.method and defense.dataset",
}


def check_cell(cfg: DictConfig) -> tuple | None:
    """The cell's fine-tune (`finetune_stage`), once the attack and the defense fit each other and every method and
    merge of the cell has passed its own checks; otherwise one SafetyLabError line naming the choice."""
    if not cfg.get("attack"):
        raise SafetyLabError("task=defend needs `attack`: +experiment=hft_grid attack=<name> (conf/attack/)")
    attack, defense, stage = cfg.attack, cfg.defense, getattr(cfg.defense.stage, "value", cfg.defense.stage)
    if (attack.method is None) != (attack.dataset is None):
        raise SafetyLabError(
            f"attack={attack.name}: set both attack.method and attack.dataset, or neither (no fine-tune)"
        )
    if stage in ("finetune", "post") and attack.method is None:
        raise SafetyLabError(
            f"defense={defense.name} acts on the fine-tune (stage {stage}), but attack={attack.name} has no fine-tune: "
            "choose an attack that fine-tunes, or a defense of stage none or align"
        )
    method_and_data = bool(defense.method and defense.dataset)
    given = {
        "align": method_and_data,
        "finetune": bool(defense.method or defense.dataset),
        "post": bool(defense.fusion) != method_and_data,
    }
    if stage in NEEDS and not given[stage]:
        raise SafetyLabError(f"defense={defense.name} (stage {stage}) needs {NEEDS[stage]}")
    if stage == "post" and defense.fusion and len(fusion_weights(defense.fusion)) != 1:
        raise SafetyLabError(f"defense={defense.name}: a cell is one λ, defense.fusion.weight (not fusion.weights)")
    finetune = finetune_stage(cfg)
    align = defense if stage == "align" else cfg.get("align")
    datasets = {"align": cfg.get("align") and cfg.align.dataset, "attack": attack.dataset, "defense": defense.dataset}
    if stage == "finetune":
        datasets["defense"] = finetune[1]  # the attack's data with the defense's settings (its `mix`) merged in
    for where, dataset in datasets.items():  # each `mix` checked before anything trains (run.py checks `dataset`'s)
        try:
            checked_mix(dataset or {})
        except SafetyLabError as e:
            raise SafetyLabError(f"{where}.{e}") from None
    for method in (align and align.method, finetune and finetune[0], stage == "post" and defense.method):
        if method and method.name != "none":
            build_method(method.name).check(method)
    return finetune


def defend(cfg: DictConfig, stages: Stages, evaluation: Evaluation, out: Path) -> Path | None:
    finetune, defense = check_cell(cfg), cfg.defense
    base = stages.base(defense if defense.stage == "align" else None)
    columns, generations = {}, []
    if cfg.eval.base:
        columns["aligned"], generations = evaluation.assess(base.model, base.tokenizer, "aligned")
        base.model.cpu()  # stages train on the CPU copy; evaluation moves models to the device
    if defense.stage == "post" and defense.fusion:
        (weight,) = fusion_weights(defense.fusion)
        inputs = fusion_inputs(stages, base, defense.fusion.inputs)
        model = FusedModel(base.model, inputs, defense.fusion.merge, plain(defense.fusion.args)).set(weight)
    elif defense.stage == "post":
        model = stages.apply(base, defense.method, defense.dataset).model
    elif finetune is not None:
        model = stages.apply(base, *finetune).model
    else:
        model = base.model
    columns[defense.name], rows = evaluation.assess(model, base.tokenizer, defense.name)
    return finish(out, columns, generations + rows, main=defense.name)
