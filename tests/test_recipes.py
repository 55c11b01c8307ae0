"""Store recipes are pinned: a refactoring that changed one would make every existing store train its artifacts
again (and silently change which entry a study's numbers come from). No model is loaded: the store is asked for
each artifact's recipe and records it instead of building."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_config import compose_resolved

from safety_lab.artifacts import ArtifactStore, recipe_hash
from safety_lab.methods import mask_dpo
from safety_lab.stages import Model, Stages


class Recorded(Exception):
    def __init__(self, kind: str, recipe: dict):
        super().__init__(kind)
        self.id = f"{kind}/{recipe_hash(recipe)}"


class RecordingStore(ArtifactStore):
    def get_or_build(self, kind, recipe, build):
        raise Recorded(kind, recipe)


def composed(tmp_path, *overrides: str) -> Stages:
    stages = Stages(OmegaConf.create(compose_resolved(list(overrides), tmp_path)))
    stages.store = RecordingStore(tmp_path / "store")
    return stages


def recorded_id(build, *args) -> str:
    with pytest.raises(Recorded) as recorded:
        build(*args)
    return recorded.value.id


def stage_id(stages: Stages, base_id: str, stage) -> str:
    return recorded_id(stages.apply, Model(None, None, base_id), stage.method, stage.dataset)


def base_id(stages: Stages) -> str:
    return recorded_id(stages.base)


def test_quickstart_base_and_adapter(tmp_path):
    stages = composed(tmp_path, "+experiment=quickstart")
    assert base_id(stages) == "base/8c32b02c218649fd"
    assert stage_id(stages, base_id(stages), stages.cfg) == "adapter/6d888c94da0beff3"


def test_a_real_models_max_length_names_its_stages(tmp_path):
    """Training sequences cut at another length make another adapter (the synthetic base's recipe holds the length,
    so its stages' ids, pinned above, do not change)."""
    ids = set()
    for n in (128, 192):
        stages = composed(tmp_path, "model=hf", "model.path=x", f"model.max_length={n}")
        ids.add(stage_id(stages, "b", stages.cfg))
    assert len(ids) == 2


def test_lora_fusion_inputs_on_the_aligned_base(tmp_path):
    stages = composed(tmp_path, "+experiment=lora_fusion")
    assert base_id(stages) == "base/1a2042fb96c857e8"
    aligned = stage_id(stages, base_id(stages), stages.cfg.align)
    assert aligned == "adapter/541bd82acc7bdb1e"
    inputs = stages.cfg.fusion.inputs
    assert stage_id(stages, aligned, inputs.task) == "adapter/b9d2f780551ebe91"  # realign's task adapter too
    assert stage_id(stages, aligned, inputs.safety) == "adapter/d88315dc0e6b7305"


def test_realign_task_mask_and_model(tmp_path, monkeypatch):
    stages = composed(tmp_path, "+experiment=realign")
    aligned = stage_id(stages, base_id(stages), stages.cfg.align)
    task = stage_id(stages, aligned, stages.cfg.method.tasks.obey)
    assert task == "adapter/b9d2f780551ebe91"
    assert stage_id(stages, aligned, stages.cfg) == "model/634a1057d404b552"  # the realigned model for one export
    monkeypatch.setattr(mask_dpo, "task_vectors", lambda *args: ([{"weight": torch.zeros(2, 2)}], [task]))
    mask = recorded_id(
        mask_dpo.MaskDPO().train,
        stages,
        Model(torch.nn.Linear(2, 2), None, aligned),
        stages.cfg.method,
        stages.cfg.dataset,
    )
    assert mask == "mask/0ed94aa93d22381a"


def test_mechanistic_full_weight_stage(tmp_path):
    stages = composed(tmp_path, "+experiment=mechanistic")
    assert stage_id(stages, "base/8c32b02c218649fd", stages.cfg.analysis.models.dpo_high) == "model/405b7d6334039d99"


def test_reference_log_probs(tmp_path):
    reference = composed(tmp_path).recipe("ref_logps", data="0123456789abcdef", reference="fedcba9876543210")
    assert recipe_hash(reference) == "bc6765c4793e4e00"


def test_a_file_dataset_in_the_checkout_names_its_stage_wherever_the_checkout_is(tmp_path):
    """The recipe holds a path inside the checkout relative to it: two checkouts (a worktree, a fresh clone) sharing
    one store reuse each other's entries; a file outside the checkout keeps its absolute path."""
    ids, recipes = set(), []
    for root in ("/a/checkout", "/another/one"):
        stages = composed(tmp_path, "dataset=aoa", f"paths.root={root}", "dataset.path=${paths.root}/data/x.json")
        ids.add(stage_id(stages, "b", stages.cfg))
        recipes.append(stages.recipe("adapter", base="b", dataset=stages.cfg.dataset))
    assert len(ids) == 1 and recipes[0]["dataset"]["path"] == "data/x.json"
    outside = composed(tmp_path, "dataset=aoa", "paths.root=/a/checkout", "dataset.path=/elsewhere/x.json")
    assert outside.recipe("adapter", dataset=outside.cfg.dataset)["dataset"]["path"] == "/elsewhere/x.json"
