"""Store recipes are pinned: a refactoring that changed one would make every existing store train its artifacts
again (and silently change which entry a study's numbers come from). No model is loaded: the store is asked for
each artifact's recipe and records it instead of building."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_config import compose_resolved

from safety_lab.artifacts import ArtifactStore, recipe_hash
from safety_lab.data.template import PromptTemplate
from safety_lab.methods import mask_dpo
from safety_lab.run import Context, base_recipe


class Recorded(Exception):
    def __init__(self, kind: str, recipe: dict):
        super().__init__(kind)
        self.id = f"{kind}/{recipe_hash(recipe)}"


class RecordingStore(ArtifactStore):
    def get_or_build(self, kind, recipe, build):
        raise Recorded(kind, recipe)


def composed(tmp_path, *overrides: str):
    cfg = OmegaConf.create(compose_resolved(list(overrides), tmp_path))
    return Context(cfg, RecordingStore(tmp_path / "store"), world=None, template=PromptTemplate())


def stage_id(ctx, base_id: str, stage) -> str:
    with pytest.raises(Recorded) as recorded:
        ctx.apply_stage(None, None, base_id, stage.method, stage.dataset)
    return recorded.value.id


def test_quickstart_base_and_adapter(tmp_path):
    ctx = composed(tmp_path, "+experiment=quickstart")
    base_id = f"base/{recipe_hash(base_recipe(ctx.cfg))}"
    assert base_id == "base/8c32b02c218649fd"
    assert stage_id(ctx, base_id, ctx.cfg) == "adapter/6d888c94da0beff3"


def test_lora_fusion_inputs_on_the_aligned_base(tmp_path):
    ctx = composed(tmp_path, "+experiment=lora_fusion")
    base_id = f"base/{recipe_hash(base_recipe(ctx.cfg))}"
    assert base_id == "base/1a2042fb96c857e8"
    aligned = stage_id(ctx, base_id, ctx.cfg.align)
    assert aligned == "adapter/541bd82acc7bdb1e"
    assert stage_id(ctx, aligned, ctx.cfg.fusion.inputs.task) == "adapter/b9d2f780551ebe91"  # realign's task adapter too
    assert stage_id(ctx, aligned, ctx.cfg.fusion.inputs.safety) == "adapter/d88315dc0e6b7305"


def test_realign_task_mask_and_model(tmp_path, monkeypatch):
    ctx = composed(tmp_path, "+experiment=realign")
    aligned = stage_id(ctx, f"base/{recipe_hash(base_recipe(ctx.cfg))}", ctx.cfg.align)
    task = stage_id(ctx, aligned, ctx.cfg.method.tasks.obey)
    assert task == "adapter/b9d2f780551ebe91"
    assert stage_id(ctx, aligned, ctx.cfg) == "model/634a1057d404b552"  # the realigned model for one export
    model = torch.nn.Linear(2, 2)
    monkeypatch.setattr(mask_dpo, "task_vectors", lambda *args: ([{"weight": torch.zeros(2, 2)}], [task]))
    ctx.base_id = aligned
    with pytest.raises(Recorded) as recorded:
        mask_dpo.MaskDPO().train(ctx, model, None, ctx.cfg.method, ctx.cfg.dataset)
    assert recorded.value.id == "mask/0ed94aa93d22381a"


def test_mechanistic_full_weight_stage(tmp_path):
    ctx = composed(tmp_path, "+experiment=mechanistic")
    assert stage_id(ctx, "base/8c32b02c218649fd", ctx.cfg.analysis.models.dpo_high) == "model/405b7d6334039d99"


def test_reference_log_probs():
    assert recipe_hash({"data": "0123456789abcdef", "reference": "fedcba9876543210"}) == "bc6765c4793e4e00"
