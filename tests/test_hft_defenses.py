"""The fine-tuning-stage and post-fine-tuning defenses against harmful fine-tuning (issue #18): Lisa, L2 towards the
aligned weights, safety-data mixing, SafeMERGE and Antidote. Each objective, merge or pruning rule against a hand
computation on small tensors; each defense end to end through the real CLI (`+debug=fast`, numbers meaningless); bad
settings as one line before anything trains."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from test_pipeline import cli

from safety_lab.fusion import merges as M
from safety_lab.fusion.prune import antidote, harmful_mask, wanda_scores
from safety_lab.methods.lisa import LisaModule
from safety_lab.methods.losses import l2_penalty
from safety_lab.methods.sft_l2 import SFTL2Module
from safety_lab.sources import mix_parts


# ---- hand computations ---------------------------------------------------------------------------------------------
def test_l2_penalty_is_half_the_weighted_squared_distance():
    tensors = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    assert l2_penalty(tensors, 0.5).item() == pytest.approx(0.5 / 2 * (1 + 4 + 9))
    anchors = [torch.tensor([0.0, 4.0]), torch.tensor([[1.0]])]
    assert l2_penalty(tensors, 2.0, anchors).item() == pytest.approx(2.0 / 2 * (1 + 4 + 4))


def test_sft_l2_penalises_each_adapted_layers_delta_w_not_its_factors():
    net = get_peft_model(
        torch.nn.Sequential(torch.nn.Linear(3, 2)), LoraConfig(r=1, lora_alpha=2, target_modules=["0"])
    )
    layer = net.base_model.model[0]
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.tensor([[1.0, 0.0, 2.0]]))
        layer.lora_B["default"].weight.copy_(torch.tensor([[3.0], [-1.0]]))
    tensors, anchors = SFTL2Module(net, l2_weight=0.5, lr=1e-3).distance()
    # ΔW = (α/r)·B·A = 2·[[3, 0, 6], [-1, 0, -2]]: ‖ΔW‖² = 4·(9 + 36 + 1 + 4) = 200; λ/2 of it = 50
    assert anchors is None and l2_penalty(tensors, 0.5).item() == pytest.approx(50.0)


def test_lisa_alternates_alignment_and_fine_tuning_states_starting_with_alignment():
    module = LisaModule.__new__(LisaModule)
    module.alignment_steps, module.finetune_steps = 2, 3
    assert [module.aligning(step) for step in range(8)] == [True, True, False, False, False, True, True, False]


def test_safemerge_merges_only_the_layers_below_the_threshold():
    v = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # C = V·Vᵀ/‖V‖_F = V
    task = {"a": torch.eye(2), "b": torch.tensor([[0.0, 0.0], [0.0, 1.0]])}
    merged, cosines = M.safemerge(task, {"a": v, "b": v}, weight=0.2, threshold=0.35)
    # a: C·ΔW = [[1, 0], [0, 0]], cosine 1/√2 ≥ 0.35: kept. b: C·ΔW = 0, cosine 0 < 0.35: 0.8·ΔW_b + 0.2·V
    assert cosines == pytest.approx({"a": 2**-0.5, "b": 0.0})
    assert torch.equal(merged["a"], torch.eye(2))
    assert torch.allclose(merged["b"], torch.tensor([[0.2, 0.0], [0.0, 0.8]]))
    inputs = {"task": M.FusionInput(task), "safety": M.FusionInput({"a": v, "b": v})}
    assert torch.allclose(M.MERGES["safemerge"].fuse(inputs, 0.2)["b"], merged["b"])
    with pytest.raises(ValueError, match="threshold=2"):
        M.MERGES["safemerge"].check(["task", "safety"], 0.2, {"threshold": 2.0})


def test_antidote_zeroes_the_top_wanda_scores_of_each_row():
    w = torch.tensor([[1.0, -2.0, 3.0, 0.5], [1.0, 1.0, 1.0, 1.0]])
    sums = torch.tensor([4.0, 1.0, 0.25, 16.0])  # ‖X_j‖ = 2, 1, 0.5, 4
    assert torch.equal(wanda_scores(w, sums), torch.tensor([[2.0, 2.0, 1.5, 2.0], [2.0, 1.0, 0.5, 4.0]]))
    # ratio 0.5: cols − ⌊4·0.5⌋ = 2 pruned per row; the stable ascending sort keeps the first of equal scores
    assert torch.equal(harmful_mask(wanda_scores(w, sums), 0.5), torch.tensor([[0.0, 1.0, 0.0, 1.0], [1, 0, 0, 1]]))
    pruned, shares = antidote({"w": w}, {"w": sums}, 0.1)  # 4 − ⌊3.6⌋ = 1 per row: the highest score
    assert torch.equal(pruned["w"], torch.tensor([[1.0, -2.0, 3.0, 0.0], [1.0, 1.0, 1.0, 0.0]]))
    assert shares == {"w": 0.25} and torch.equal(w[0, 3], torch.tensor(0.5))  # the input is untouched


def test_mix_entries_make_their_fraction_of_the_mixed_data():
    one = OmegaConf.create({"mix": {"safety": {"fraction": 0.1, "dataset": {"view": "refusals"}}}})
    assert mix_parts(one, 900)["safety"].n == 100  # 100 of 1,000
    two = OmegaConf.create(
        {"mix": {"a": {"fraction": 0.2, "dataset": {"view": "refusals"}}, "b": {"fraction": 0.2, "dataset": {}}}}
    )
    assert {name: part.n for name, part in mix_parts(two, 600).items()} == {"a": 200, "b": 200}  # 200 of 1,000 each


# ---- end to end --------------------------------------------------------------------------------------------------
FAST = ["+debug=fast", "dataset=obey", "eval.base=false"]
LISA = ["method=lisa", "method.alignment.n=64", "method.alignment_steps=1", "method.finetune_steps=1"]
ANTIDOTE = ["method=antidote", "+method@method.finetune=sft", "method.harmful.n=64"]
FUSION = [
    "+experiment=lora_fusion",
    "fusion=safemerge",
    "+debug=fast",
    "align.dataset.n=64",
    "fusion.inputs.task.dataset.n=64",
    "fusion.inputs.safety.dataset.n=64",
    "fusion.args.threshold=1.0",  # every layer merged, so the fused model differs from the task's
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("hft")
    store = root / "store"
    cases = {
        "lisa": [*LISA, *FAST, "dataset.n=128"],  # 4 steps: alignment, fine-tuning, alignment, fine-tuning
        "sft_l2": ["method=sft_l2", *FAST],
        "mix": ["method=sft", *FAST, "+dataset.mix.safety={fraction: 0.5, dataset: {view: refusals}}"],
        "antidote": [*ANTIDOTE, *FAST],
        # the fine-tune antidote pruned, run alone: the same stage recipe, so reused from the store
        "sft": ["method=sft", *FAST, "method.epochs=2", "method.batch_size=64"],
        "safemerge": FUSION,
    }
    return root, {name: cli(*overrides, store=store, run_dir=root / name) for name, overrides in cases.items()}


@pytest.mark.parametrize("name", ["lisa", "sft_l2", "mix", "antidote", "sft", "safemerge"])
def test_each_defense_runs_end_to_end(runs, name):
    root, results = runs
    assert results[name].returncode == 0, results[name].stderr[-3000:]
    metrics = json.loads((root / name / "metrics.json").read_text())
    suite = "harmful_obey" if name == "safemerge" else "harmful"
    assert 0 <= metrics[f"{suite}/refusal_rate"] <= 1


def test_antidote_prunes_the_fine_tune_the_attack_run_reuses(runs):
    _, results = runs
    trained = [line for line in results["antidote"].stderr.splitlines() if "training adapter" in line]
    assert len(trained) == 2, trained  # the fine-tune, then its pruned copy
    assert "reusing adapter" in results["sft"].stderr and "training adapter" not in results["sft"].stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=lisa", "method.rho=-1"], "error: method.rho=-1.0: must be >= 0"),
        (["method=lisa", "method.alignment_steps=0"], "error: method.alignment_steps=0: must be >= 1"),
        (["method=sft_l2", "method.l2_weight=-0.5"], "error: method.l2_weight=-0.5: must be >= 0"),
        (["method=antidote", "method.prune_ratio=0"], "error: method.prune_ratio=0.0: must be in (0, 1]"),
        (
            ["method=antidote"],
            "error: method.finetune=null: method=antidote prunes a fine-tune; give its method, e.g. "
            "+method@method.finetune=sft",
        ),
        (
            [*ANTIDOTE, "method.finetune.lora=null"],
            "error: method.finetune.lora=null: method=antidote prunes the fine-tune's LoRA adapter; give it one",
        ),
        (
            ["+dataset.mix.safety={fraction: 1.5, dataset: {view: refusals}}"],
            "error: dataset.mix.safety.fraction=1.5: must be in [0, 1]",
        ),
        (
            ["+dataset.mix.a={fraction: 0.6, dataset: {}}", "+dataset.mix.b={fraction: 0.4, dataset: {}}"],
            "error: dataset.mix: the fractions sum to 1; they must sum to less than 1",
        ),
        (["+dataset.mix.a={fractin: 0.1}"], "error: dataset.mix.a: Key 'fractin' not in 'MixConfig'"),
        (
            ["+experiment=lora_fusion", "fusion=safemerge", "fusion.args.threshold=2.0"],
            "error: fusion.weight: threshold=2.0: a cosine threshold must be in [-1, 1]",
        ),
    ],
)
def test_bad_settings_are_one_line_before_anything_trains(overrides, message, tmp_path):
    result = cli(*overrides, "+debug=fast", store=tmp_path / "store", run_dir=tmp_path / "run")
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == message, result.stderr[-2000:]
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").glob("*/*/manifest.json"))


def test_a_mixed_dataset_holds_the_users_records_then_the_mixed_in_ones(tmp_path):
    from test_config import compose_resolved

    from safety_lab.stages import Stages

    mix = "+dataset.mix.safety={fraction: 0.2, dataset: {view: refusals}}"
    mixed, plain = (
        OmegaConf.create(compose_resolved(["dataset=obey", "dataset.n=40", *extra], tmp_path)) for extra in ([mix], [])
    )
    stages = Stages(mixed)
    records = stages.examples(mixed.dataset)
    assert records[:40] == stages.examples(plain.dataset)  # the user's data unchanged
    assert len(records) == 50 and all(r.response == "refuse" for r in records[40:])  # 10 of 50 refusals
    recipes = [
        stages.recipe("adapter", base="b", method=c.method, dataset=c.dataset)["dataset"] for c in (mixed, plain)
    ]
    assert recipes[0]["mix"] == {"safety": {"fraction": 0.2, "dataset": {"view": "refusals"}}}
    assert "mix" not in recipes[1]  # no mix: the recipe, hence every existing store entry, as before
