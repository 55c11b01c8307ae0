"""DELLA, Breadcrumbs, Model Stock, SLERP and TIES' mergekit weighting: against mergekit's own merge methods (the
dev dependency, called through `mergekit.merge_methods.registry` with their defaults) on seeded tensors, and against
hand computations on small ones; registry checks; trimming keeps at least one entry."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch
from mergekit.merge_methods import registry
from mergekit.merge_methods.base import TensorGroup
from peft.utils import merge_utils

from safety_lab.config import register
from safety_lab.errors import SafetyLabError
from safety_lab.fusion import merges as M
from safety_lab.tasks.fuse import fusion_weights

REPO = Path(__file__).resolve().parents[1]
SHAPES = {"a": (6, 9), "b": (7,), "c": (3, 4, 5)}  # a weight, a 1-d tensor (a norm), a 3-d tensor


def seeded(n: int, seed: int, base: bool = False):
    """n task vectors over SHAPES (and a base, when asked), seeded."""
    g = torch.Generator().manual_seed(seed)
    vectors = [{k: torch.randn(s, generator=g) for k, s in SHAPES.items()} for _ in range(n)]
    return (vectors, {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}) if base else vectors


def mergekit_merge(name: str, vectors, w0, **parameters):
    """mergekit's merge `name` of the models W0 + τ_i (W0 the base, input 0), returned as task vectors W − W0; every
    key is one group, merged in key order (so random draws come key by key, model by model)."""
    keys = list(vectors[0])
    groups = [TensorGroup.from_tensors([w0[k]] + [w0[k] + v[k] for v in vectors], base_index=0) for k in keys]
    merged = registry.get(name)(groups, parameters=parameters)
    return {k: m - w0[k] for k, m in zip(keys, merged)}


def max_error(ours, theirs) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[k] - theirs[k]).abs().max().item() for k in ours)


# mergekit merges the models W0 + τ_i: its task vectors carry the rounding of (W0 + τ) − W0 (measured ≤ 7.2e-7 here;
# with W0 = 0 the results are ours bit for bit).
TOLERANCE = 2e-6


# ---- equal to mergekit -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("normalize, disjoint", [(True, "mean"), (False, "sum")])
def test_ties_with_mergekit_weighting_equals_mergekit_ties(normalize, disjoint):
    vectors, w0 = seeded(3, seed=0, base=True)
    weights = [0.5, 1.0, 0.8]
    ours = M.ties(vectors, weights, density=0.4, scale=0.9, disjoint=disjoint, weighting="mergekit")
    theirs = mergekit_merge("ties", vectors, w0, weight=weights, density=0.4, normalize=normalize, **{"lambda": 0.9})
    assert max_error(ours, theirs) <= TOLERANCE
    peft = M.ties(vectors, weights, density=0.4, scale=0.9, disjoint=disjoint)  # the default: not the same merge
    assert max_error(peft, theirs) > 1e-2


@pytest.mark.parametrize("parameters", [{}, {"rescale": False, "normalize": False, "lambda": 1.1}])
def test_della_equals_mergekit_with_the_same_seed(parameters):
    vectors, w0 = seeded(2, seed=1, base=True)
    weights = [0.7, 0.4]
    ours = M.della(
        vectors,
        weights,
        density=0.6,
        epsilon=0.15,
        scale=parameters.get("lambda", 1.0),
        rescale=parameters.get("rescale", True),
        disjoint="mean" if parameters.get("normalize", True) else "sum",
        seed=5,
    )
    torch.manual_seed(5)  # mergekit draws from the global generator, key by key, model by model
    theirs = mergekit_merge("della", vectors, w0, weight=weights, density=0.6, **parameters)  # default epsilon 0.15
    assert max_error(ours, theirs) <= TOLERANCE
    assert torch.equal(M.della(vectors, weights, 0.6, seed=5)["a"], M.della(vectors, weights, 0.6, seed=5)["a"])
    assert not torch.equal(M.della(vectors, weights, 0.6, seed=6)["a"], M.della(vectors, weights, 0.6, seed=5)["a"])


@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_equals_mergekit(rescale):
    vectors, w0 = seeded(3, seed=2, base=True)
    weights = [1.0, 0.5, -0.3]
    ours = M.breadcrumbs(vectors, weights, density=0.5, gamma=0.1, scale=0.8, rescale=rescale)
    theirs = mergekit_merge(
        "breadcrumbs", vectors, w0, weight=weights, density=0.5, gamma=0.1, rescale=rescale, **{"lambda": 0.8}
    )
    assert max_error(ours, theirs) <= TOLERANCE
    defaults = mergekit_merge("breadcrumbs", vectors, w0, weight=weights, density=0.9)  # gamma 0.01, no rescale
    assert max_error(M.breadcrumbs(vectors, weights, density=0.9), defaults) <= TOLERANCE


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit(n, filter_wise):
    vectors, w0 = seeded(n, seed=3, base=True)
    vectors[1] = {k: v + 0.8 * vectors[0][k] for k, v in vectors[1].items()}  # correlated: t far from 0 and 1
    theirs = mergekit_merge("model_stock", vectors, w0, filter_wise=filter_wise)
    assert max_error(M.model_stock(vectors, filter_wise=filter_wise), theirs) <= TOLERANCE


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_equals_mergekit_on_task_vectors(t):
    first, second = seeded(2, seed=4)
    second["b"] = 2 * first["b"]  # collinear: mergekit's linear branch
    second["c"] = -first["c"]  # antipodal: linear too
    ours = M.slerp(first, second, t)
    # mergekit's slerp of two models, the first as its `base_model` (t = 0): here the task vectors themselves
    theirs = registry.get("slerp")(
        [TensorGroup.from_tensors([first[k], second[k]], base_index=0) for k in SHAPES], parameters={"t": t}
    )
    assert max_error(ours, dict(zip(SHAPES, theirs))) <= TOLERANCE


# ---- hand computations ----------------------------------------------------------------------------------------
U, V = {"w": torch.tensor([3.0, -2.0, 0.5, 1.0])}, {"w": torch.tensor([-1.0, 4.0, 0.1, -3.0])}


def test_ties_mergekit_weighting_by_hand():
    # trimmed (density 0.5): u → [3, -2, 0, 0], v → [0, 4, 0, -3]; weighted (1, 0.5): v → [0, 2, 0, -1.5]
    # sums [3, 0, 0, -1.5] → signs [+, +, +, -]; agreeing: [u], [v], [none], [v]; divided by their weights
    assert torch.equal(M.ties([U, V], [1.0, 0.5], 0.5, weighting="mergekit")["w"], torch.tensor([3.0, 4.0, 0.0, -3.0]))
    assert torch.equal(M.ties([U, V], [1.0, 0.5], 0.5)["w"], torch.tensor([3.0, 2.0, 0.0, -1.5]))  # PEFT, default
    # the election differs too: weights (0.2, 1) make v outvote u in the first entry only under mergekit's weighting
    assert M.ties([U, V], [0.2, 1.0], 1.0, weighting="mergekit")["w"][0] == -1.0
    assert M.ties([U, V], [0.2, 1.0], 1.0)["w"][0] == pytest.approx(0.6)


def test_breadcrumbs_by_hand():
    w = {"w": torch.tensor([10.0, -9.0, 8.0, -7.0, 6.0, -5.0, 4.0, -3.0, 2.0, -1.0])}
    # gamma 0.1 drops the largest entry (10), density 0.4 keeps the next 4: -9, 8, -7, 6
    kept = torch.tensor([0.0, -9.0, 8.0, -7.0, 6.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    assert torch.equal(M.breadcrumbs([w], [0.5], density=0.4, gamma=0.1)["w"], 0.5 * kept)
    rescaled = M.breadcrumbs([w], [1.0], density=0.4, gamma=0.1, rescale=True)["w"]  # to the L1 norm: 55 / 30
    assert torch.allclose(rescaled, kept * 55 / 30)
    # gamma larger than 1 - density leaves room: density 0.8 of 10 keeps 8, so at most 2 dropped from the top
    assert torch.equal(M.breadcrumbs([w], [1.0], density=0.8, gamma=0.5)["w"], torch.cat([torch.zeros(2), w["w"][2:]]))


def test_della_by_hand():
    # without pruning (density 1) DELLA is TIES' election on the weighted vectors, mean over the agreeing weights:
    # weighted (1, 0.5): u = [3, -2, .5, 1], v = [-.5, 2, .05, -1.5]; sums [2.5, 0, .55, -.5] → [+, +, +, -]
    # agreeing: [u], [v], [u, v], [v]: [3/1, 2/.5, (.5 + .05)/1.5, -1.5/.5]
    assert torch.allclose(M.della([U, V], [1.0, 0.5], density=1.0)["w"], torch.tensor([3.0, 4.0, 0.55 / 1.5, -3.0]))
    # keep probabilities by rank within each row: [1, -3, 2] → ranks [1, 3, 2] → density − ε, density + ε, density
    rows = {"w": torch.tensor([[1.0, -3.0, 2.0]]).repeat(20000, 1)}
    kept = M.della([rows], [1.0], density=0.6, epsilon=0.2, rescale=False, seed=0)["w"] != 0
    assert torch.allclose(kept.float().mean(0), torch.tensor([0.4, 0.8, 0.6]), atol=0.015)
    # rescaled: the survivors of each vector's tensor carry its L1 norm
    one = {"w": torch.tensor([[1.0, -3.0, 2.0, 0.5]] * 50)}
    out = M.della([one], [1.0], density=0.5, epsilon=0.1, seed=1)["w"]
    assert out.abs().sum().item() == pytest.approx(one["w"].abs().sum().item(), rel=1e-6)
    ratio = out[out != 0] / one["w"][out != 0]  # one factor for the whole tensor
    assert torch.allclose(ratio, ratio[:1].expand_as(ratio)) and ratio[0] > 1


def test_model_stock_by_hand():
    a, b = {"w": torch.tensor([1.0, 1.0])}, {"w": torch.tensor([1.0, 0.0])}
    # cos θ = 1/√2, t = 2·cos/(1 + cos) = 2(√2 − 1); ΔW = t·mean = t·[1, 0.5]
    t = 2 * (math.sqrt(2) - 1)
    assert torch.allclose(M.model_stock([a, b])["w"], torch.tensor([t, t / 2]))
    assert torch.allclose(M.model_stock([a, b], scale=0.5)["w"], torch.tensor([t / 2, t / 4]))
    assert torch.equal(M.model_stock([a, {"w": -a["w"]}])["w"], torch.zeros(2))  # cos −1: singular, t = 0
    assert torch.equal(M.model_stock([b, {"w": torch.tensor([0.0, 2.0])}])["w"], torch.zeros(2))  # orthogonal: t = 0
    rows = {"w": torch.tensor([[1.0, 1.0], [1.0, 0.0]])}, {"w": torch.tensor([[1.0, 0.0], [1.0, 0.0]])}
    # filter-wise: row 0 as above, row 1 identical in both (cos 1, t = 1)
    assert torch.allclose(M.model_stock(rows, filter_wise=True)["w"], torch.tensor([[t, t / 2], [1.0, 0.0]]))


def test_slerp_by_hand():
    a, b = {"w": torch.tensor([[1.0, 0.0]])}, {"w": torch.tensor([[0.0, 1.0]])}
    half = 2**-0.5  # θ = π/2: sin(π/4)/sin(π/2) on each; the norm stays 1 where a lerp would give 1/√2
    assert torch.allclose(M.slerp(a, b, 0.5)["w"], torch.tensor([[half, half]]))
    assert torch.allclose(M.slerp(a, b, 1 / 3)["w"], torch.tensor([[math.cos(math.pi / 6), math.sin(math.pi / 6)]]))
    assert torch.equal(M.slerp(a, b, 0.0)["w"], a["w"]) and torch.allclose(M.slerp(a, b, 1.0)["w"], b["w"])
    collinear = {"w": 3 * a["w"]}  # |cos θ| > 0.9995: linear
    assert torch.allclose(M.slerp(a, collinear, 0.5)["w"], 2 * a["w"])
    # one angle per tensor, whatever its shape: orthogonal rows of norms 1 and 2, θ = π/2 for the whole tensor
    rows = M.slerp({"m": torch.tensor([[1.0, 0.0], [0.0, 0.0]])}, {"m": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}, 0.5)
    assert torch.allclose(rows["m"], half * torch.tensor([[1.0, 0.0], [0.0, 2.0]]))


def test_magnitude_trimming_keeps_at_least_one_entry():
    tiny = {"w": torch.tensor([0.5, -3.0, 1.0])}  # 3 entries < 1/0.2: int(0.2·3) = 0
    assert torch.equal(M.ties([tiny], [1.0], density=0.2)["w"], torch.tensor([0.0, -3.0, 0.0]))
    assert torch.equal(merge_utils.magnitude_based_pruning(tiny["w"], 0.2), torch.zeros(3))  # PEFT zeroes it
    assert torch.equal(M.breadcrumbs([tiny], [1.0], density=0.2, gamma=0.0)["w"], torch.tensor([0.0, -3.0, 0.0]))


# ---- registry ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "merge, inputs, weight, args, message",
    [
        ("slerp", ["task", "safety", "extra"], 0.5, {}, "merge 'slerp' takes exactly 2 inputs, got 3"),
        ("slerp", ["task", "safety"], 1.5, {}, "outside [0.0, 1.0]"),
        ("model_stock", ["task"], 1.0, {}, "merge 'model_stock' takes at least 2 inputs, got 1"),
        ("della", ["a", "b"], 1.0, {"density": 0.9}, "epsilon=0.15: density ± epsilon must lie in (0, 1)"),
        ("della", ["a", "b"], 1.0, {"density": 0.0}, "density must be in (0, 1]"),
        ("breadcrumbs", ["a", "b"], 1.0, {"gamma": 1.0}, "gamma must be in [0, 1)"),
    ],
)
def test_registry_checks_of_the_new_merges(merge, inputs, weight, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        M.MERGES[merge].check(inputs, weight, args)
    with pytest.raises(ValueError, match="weighting must be 'peft' or 'mergekit', got 'avg'"):
        M.ties([U, V], [1.0, 1.0], weighting="avg")


def test_registered_merges_equal_their_functions():
    vectors = seeded(2, seed=6)
    inputs = {"task": M.FusionInput(vectors[0], weight=0.6), "safety": M.FusionInput(vectors[1], weight=1.2)}
    for name, expected in [
        ("della", M.della(vectors, [0.6, 1.2], scale=0.7, seed=2)),
        ("breadcrumbs", M.breadcrumbs(vectors, [0.6, 1.2], scale=0.7)),
        ("model_stock", M.model_stock(vectors, scale=0.7)),
        ("slerp", M.slerp(*vectors, 0.7)),
        ("ties", M.ties(vectors, [0.6, 1.2], scale=0.7, weighting="mergekit")),
    ]:
        args = {"seed": 2} if name == "della" else {"weighting": "mergekit"} if name == "ties" else {}
        M.MERGES[name].check(list(inputs), 0.7, args)
        assert max_error(M.MERGES[name].fuse(inputs, 0.7, **args), expected) == 0


def test_slerp_with_three_inputs_fails_before_loading_naming_them():
    from hydra import compose, initialize_config_dir

    register()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "fusion=slerp",
                "+method@fusion.inputs.extra.method=sft",
                "+dataset@fusion.inputs.extra.dataset=obey",
            ],
        )
    with pytest.raises(SafetyLabError, match=re.escape("takes exactly 2 inputs, got 3: ['task', 'safety', 'extra']")):
        fusion_weights(cfg.fusion)
