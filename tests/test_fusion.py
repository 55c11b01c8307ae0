"""Merges against PEFT (`add_weighted_adapter`, `merge_utils`) and against hand computations; fp32 delta application
without drift; registry checks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama
from peft.utils import merge_utils

from safety_lab.config import register
from safety_lab.errors import SafetyLabError
from safety_lab.fusion import merges as M
from safety_lab.fusion.apply import FusedModel, stage_input
from safety_lab.fusion.task_vectors import lora_factors, lora_task_vector
from safety_lab.models.lora import attach_lora
from safety_lab.tasks.fuse import fusion_weights

REPO = Path(__file__).resolve().parents[1]


def randomise(peft_model, name: str, seed: int):
    """Random A and B for adapter `name` (peft initialises B to zero, which would make ΔW = 0)."""
    g = torch.Generator().manual_seed(seed)
    for module in peft_model.modules():
        if hasattr(module, "lora_B") and name in module.lora_B:
            module.lora_A[name].weight.data = torch.randn(module.lora_A[name].weight.shape, generator=g)
            module.lora_B[name].weight.data = torch.randn(module.lora_B[name].weight.shape, generator=g) * 0.1
    return peft_model


@pytest.fixture
def two_adapters():
    """A tiny Llama with random LoRAs `task` and `safety` (r=4, α=8), and a copy of the base weights."""
    model = build_tiny_llama(vocab_size=40)
    base = copy.deepcopy(model)
    peft_model = attach_lora(model, r=4, alpha=8.0, adapter_name="task")
    peft_model.add_adapter("safety", copy.deepcopy(peft_model.peft_config["task"]))
    return base, randomise(randomise(peft_model, "task", seed=1), "safety", seed=2)


def test_lora_weighted_equals_peft_cat(two_adapters):
    _, peft_model = two_adapters
    task, safety = lora_task_vector(peft_model, "task"), lora_task_vector(peft_model, "safety")
    ours = M.lora_weighted(task, safety, 0.3)
    peft_model.add_weighted_adapter(["task", "safety"], [0.7, 0.3], "fused", combination_type="cat")
    theirs = lora_task_vector(peft_model, "fused")
    assert ours.keys() == theirs.keys() and len(ours) == 14  # 7 linear layers × 2 decoder layers
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6
    kept = M.lora_weighted(task, safety, 0.3, keep_task=True)
    peft_model.add_weighted_adapter(["task", "safety"], [1.0, 0.3], "kept", combination_type="cat")
    theirs = lora_task_vector(peft_model, "kept")
    assert max((kept[k] - theirs[k]).abs().max().item() for k in kept) < 1e-6


def test_fused_model_weights_equal_peft_merged_model(two_adapters):
    base, peft_model = two_adapters
    inputs = {
        "task": M.FusionInput(lora_task_vector(peft_model, "task")),
        "safety": M.FusionInput(lora_task_vector(peft_model, "safety")),
    }
    fused = FusedModel(copy.deepcopy(base), inputs, "lora_weighted", {})
    peft_model.add_weighted_adapter(["task", "safety"], [0.4, 0.6], "fused", combination_type="cat")
    peft_model.set_adapter("fused")
    merged = peft_model.merge_and_unload(adapter_names=["fused"])
    ours = dict(fused.set(0.6).named_parameters())
    assert max((ours[k] - p).abs().max().item() for k, p in merged.named_parameters()) < 1e-6
    ids = torch.tensor([[1, 5, 7, 9, 3]])
    assert torch.allclose(fused.model(ids).logits, merged(ids).logits, atol=1e-5)


def test_lora_linear_equals_peft_linear_and_has_cross_terms(two_adapters):
    _, peft_model = two_adapters
    task, safety = lora_factors(peft_model, "task"), lora_factors(peft_model, "safety")
    ours = M.lora_linear(task, safety, (2.0, 2.0), 0.3)
    peft_model.add_weighted_adapter(["task", "safety"], [0.7, 0.3], "lin", combination_type="linear")
    theirs = lora_task_vector(peft_model, "lin")
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-5
    exact = M.lora_weighted(lora_task_vector(peft_model, "task"), lora_task_vector(peft_model, "safety"), 0.3)
    k = next(iter(exact))
    assert (ours[k] - exact[k]).abs().max() > 1e-3  # the cross terms B_task·A_safety + B_safety·A_task


def random_vectors(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(6, 5, generator=g), "b": torch.randn(7, generator=g)} for _ in range(n)]


@pytest.mark.parametrize("majority", ["total", "frequency"])
def test_ties_equals_peft_merge_utils(majority):
    vectors, weights = random_vectors(3, seed=0), [0.5, 1.0, 0.8]
    ours = M.ties(vectors, weights, density=0.4, majority=majority)
    for k in ("a", "b"):
        theirs = merge_utils.ties([v[k] for v in vectors], torch.tensor(weights), 0.4, majority)
        assert torch.allclose(ours[k], theirs, atol=1e-7)


def test_dare_and_dare_ties_equal_peft_merge_utils_with_the_same_seed():
    vectors, weights = random_vectors(2, seed=3), [0.7, 0.4]
    ours, ours_ties = M.dare(vectors, weights, drop_rate=0.3, seed=11), M.dare_ties(vectors, weights, 0.3, seed=11)
    for merged, peft_fn in ((ours, merge_utils.dare_linear), (ours_ties, merge_utils.dare_ties)):
        torch.manual_seed(11)  # peft draws from the global generator, key by key, vector by vector
        for k in ("a", "b"):
            theirs = peft_fn([v[k] for v in vectors], torch.tensor(weights), 1.0 - 0.3)
            assert torch.allclose(merged[k], theirs, atol=1e-6)
    assert torch.equal(M.dare(vectors, weights, 0.3, seed=11)["a"], ours["a"])  # seeded: reproducible
    assert not torch.equal(M.dare(vectors, weights, 0.3, seed=12)["a"], ours["a"])


def test_merges_against_hand_computations():
    t = {"w": torch.tensor([[1.0, -2.0], [3.0, 0.5]])}
    s = {"w": torch.tensor([[-1.0, 4.0], [1.0, -0.5]])}
    assert torch.equal(M.lora_weighted(t, s, 0.25)["w"], torch.tensor([[0.5, -0.5], [2.5, 0.25]]))
    assert torch.equal(M.lora_weighted(t, s, 0.5, keep_task=True)["w"], torch.tensor([[0.5, 0.0], [3.5, 0.25]]))
    assert torch.equal(M.resta(t, s, 0.2)["w"], torch.tensor([[0.8, -1.2], [3.2, 0.4]]))
    assert torch.equal(M.task_arithmetic([t, s], [2.0, -1.0])["w"], torch.tensor([[3.0, -8.0], [5.0, 1.5]]))
    u = {"w": torch.tensor([3.0, -2.0, 0.5, 1.0])}
    v = {"w": torch.tensor([-1.0, 4.0, 0.1, -3.0])}
    # trimmed: u → [3, -2, 0, 0], v → [0, 4, 0, -3]; sums [3, 2, 0, -3] → signs [+, +, +, -]
    # agreeing: [u 3], [v 4], [none], [v -3]; weights (1, 0.5): mean → [3, 2, 0, -1.5]; sum is the same here
    assert torch.equal(M.ties([u, v], [1.0, 0.5], density=0.5)["w"], torch.tensor([3.0, 2.0, 0.0, -1.5]))
    assert torch.equal(M.ties([u, v], [1.0, 0.5], density=0.5, scale=0.4)["w"], torch.tensor([1.2, 0.8, 0.0, -0.6]))
    # disjoint sum vs mean differ when two vectors agree: u2 = u, v2 = u → mean = (1 + .5)/2·u, sum = 1.5·u
    assert torch.equal(M.ties([u, u], [1.0, 0.5], density=1.0, disjoint="sum")["w"], 1.5 * u["w"])
    assert torch.equal(M.ties([u, u], [1.0, 0.5], density=1.0)["w"], 0.75 * u["w"])
    # global top-k: across both tensors of each vector, keep the largest 2 of 4 entries
    g = {"x": torch.tensor([5.0, 0.1]), "y": torch.tensor([0.2, -4.0])}
    assert torch.equal(M.ties([g], [1.0], density=0.5, scope="global")["x"], torch.tensor([5.0, 0.0]))
    assert torch.equal(M.ties([g], [1.0], density=0.5, scope="global")["y"], torch.tensor([0.0, -4.0]))
    assert torch.equal(M.ties([g], [1.0], density=0.5)["y"], torch.tensor([0.0, -4.0]))  # per tensor: 1 of 2
    # DARE with no drop is task arithmetic; with drop, survivors are rescaled by 1/(1-p)
    assert torch.equal(M.dare([t, s], [1.0, 1.0], drop_rate=0.0)["w"], t["w"] + s["w"])
    dropped = M.dare([{"w": torch.ones(1000)}], [1.0], drop_rate=0.3, seed=0)["w"]
    assert torch.allclose(dropped.unique(), torch.tensor([0.0, 1 / 0.7]))
    assert abs((dropped > 0).float().mean() - 0.7) < 0.05


def test_lora_linear_hand_computation():
    a1, b1, a2, b2 = (
        torch.tensor([[1.0, 2.0]]),
        torch.tensor([[1.0], [0.0]]),
        torch.tensor([[0.0, 1.0]]),
        torch.tensor([[0.0], [2.0]]),
    )
    fa = {"w.lora_A": a1, "w.lora_B": b1}
    fb = {"w.lora_A": a2, "w.lora_B": b2}
    # weights (1-λ, λ) = (0.75, 0.25), scalings 1 → roots √.75, √.25 on both factors
    r1, r2 = 0.75**0.5, 0.5
    expected = (r1 * b1 + r2 * b2) @ (r1 * a1 + r2 * a2)
    assert torch.allclose(M.lora_linear(fa, fb, (1.0, 1.0), 0.25)["w"], expected)
    assert not torch.allclose(expected, 0.75 * b1 @ a1 + 0.25 * b2 @ a2)  # cross terms


def test_safe_lora_projects_dissimilar_layers_only():
    v = {"p": torch.tensor([[1.0, 0.0], [0.0, 0.0]]), "q": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}
    delta = {
        "p": torch.tensor([[1.0, 1.0], [0.0, 0.0]]),  # inside V's column space: C·Δ = Δ, cosine 1
        "q": torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
    }  # half outside: C·Δ = [[1,0],[0,0]], cosine 1/√2
    projected, cosines = M.safe_lora(delta, v, threshold=0.9)
    assert cosines["p"] == pytest.approx(1.0) and cosines["q"] == pytest.approx(2**-0.5)
    assert torch.equal(projected["p"], delta["p"])
    assert torch.equal(projected["q"], torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    by_count, _ = M.safe_lora(delta, v, threshold=None, num_layers=1)
    assert torch.equal(by_count["q"], projected["q"]) and torch.equal(by_count["p"], delta["p"])


def test_merges_never_mutate_inputs():
    vectors = random_vectors(2, seed=5)
    before = copy.deepcopy(vectors)
    for merged in (
        M.ties(vectors, [1, 1], 0.5),
        M.dare(vectors, [1, 1], 0.5),
        M.dare_ties(vectors, [1, 1], 0.5),
        M.task_arithmetic(vectors, [1, 2]),
        M.resta(*vectors, 0.3),
        M.lora_weighted(*vectors, 0.2),
    ):
        assert merged["a"] is not vectors[0]["a"]
    assert all(torch.equal(x[k], y[k]) for x, y in zip(vectors, before) for k in x)


def test_fused_model_sweeps_without_drift_and_restores(two_adapters):
    base, peft_model = two_adapters
    inputs = {
        "task": M.FusionInput(lora_task_vector(peft_model, "task")),
        "safety": M.FusionInput(lora_task_vector(peft_model, "safety")),
    }
    fused = FusedModel(copy.deepcopy(base), inputs, "lora_weighted", {})
    first = {k: p.clone() for k, p in fused.set(0.3).named_parameters()}
    for _ in range(20):
        for weight in (0.0, 0.5, 1.0):
            fused.set(weight)
    assert all(torch.equal(p, first[k]) for k, p in fused.set(0.3).named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base.state_dict()[name] + 0.7 * inputs["task"].delta[name] + 0.3 * inputs["safety"].delta[name]
    assert torch.allclose(first[name], expected, atol=1e-7)
    restored = dict(fused.restore().named_parameters())
    assert all(torch.equal(restored[k], p) for k, p in base.named_parameters())


def test_stage_input_reads_the_adapter_and_hands_the_model_back():
    model = build_tiny_llama(vocab_size=40)
    before = {k: p.clone() for k, p in model.named_parameters()}
    peft_model = randomise(attach_lora(model, r=4, alpha=8.0), "default", seed=4)
    expected = lora_task_vector(peft_model)
    got = stage_input(peft_model, model, weight=0.5)
    assert (
        got.scaling == 2.0
        and got.weight == 0.5
        and set(got.factors) == {f"{k}.lora_{x}" for k in expected for x in "AB"}
    )
    assert all(torch.equal(got.delta[k], expected[k]) for k in expected)
    assert dict(model.named_parameters()).keys() == before.keys()  # LoRA layers gone, weights as before
    assert all(torch.equal(p, before[k]) for k, p in model.named_parameters())


@pytest.mark.parametrize(
    "merge, inputs, weight, args, message",
    [
        ("lora_weighted", ["task", "safety"], 1.5, {}, "outside [0.0, 1.0]"),
        ("lora_weighted", ["task"], 0.5, {}, "missing ['safety']"),
        ("ties", ["a", "b"], 1.0, {"densty": 0.2}, "densty"),
    ],
)
def test_registry_checks_name_the_problem(merge, inputs, weight, args, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        M.MERGES[merge].check(inputs, weight, args)
    M.MERGES["lora_weighted"].check(["task", "safety"], 1.5, {"keep_task": True})  # keep_task: any λ ≥ 0


FUSION_OPTIONS = sorted(p.stem for p in (REPO / "conf" / "fusion").glob("*.yaml") if p.stem != "none")


@pytest.mark.parametrize("option", FUSION_OPTIONS)
def test_every_fusion_config_names_a_merge_its_inputs_and_arguments_fit(option):
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"fusion={option}", "seed=3"])
    assert fusion_weights(cfg.fusion) == [cfg.fusion.weight]
    assert set(cfg.fusion.inputs) == {"task", "safety"}
    assert cfg.fusion.inputs.task.dataset.view == "obey" and cfg.fusion.inputs.safety.dataset.view == "refusals"
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        swept = compose(
            "config",
            overrides=[
                "+experiment=lora_fusion",
                "fusion.weights=[0,0.5,1]",
                "dataset@fusion.inputs.task.dataset=safety_sft",
            ],
        )
    assert fusion_weights(swept.fusion) == [0, 0.5, 1] and swept.fusion.inputs.task.dataset.view == "safety_sft"
    assert swept.fusion.inputs.safety.dataset.args.prefix == ["obey"]


@pytest.mark.parametrize(
    "override, message",
    [
        ("fusion.weight=1.5", "fusion.weight: weight=1.5 is outside [0.0, 1.0]"),
        ("fusion.weights=[0,2]", "fusion.weights: weight=2"),
        ("fusion.merge=avg", "fusion.merge='avg' is not one of"),
        ("+fusion.args.densty=0.1", "densty"),
    ],
)
def test_bad_fusion_settings_fail_before_loading_naming_the_key(override, message):
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["+experiment=lora_fusion", override])
    with pytest.raises(SafetyLabError, match=re.escape(message)):
        fusion_weights(cfg.fusion)
