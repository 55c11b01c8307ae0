"""The alignment-stage defenses (methods/alignment_defenses.py): each objective against a hand computation on small
tensors; each method end to end as a run's `align` stage with `+debug=fast` (on the synthetic world, and Booster on
the tiny Hugging Face model with file data); bad settings as one line before anything trains."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_safety_lab

from safety_lab.methods.alignment_defenses import (
    booster_regulariser,
    gaussian_mmd,
    perturbed_loss,
    repnoise_loss,
    scaled_to_norm,
)

FIX = Path(__file__).parent / "fixtures"
SMALL = ["align.dataset.n=64", "align.method.epochs=1", "align.method.batch_size=32"]


def scalar_linear(weight: float) -> torch.nn.Linear:
    layer = torch.nn.Linear(1, 1, bias=False)
    layer.weight.data.fill_(weight)
    return layer


def test_scaled_to_norm_uses_one_norm_over_all_tensors():
    scaled = scaled_to_norm([torch.tensor([3.0]), torch.tensor([[0.0, 4.0]])], 2.0)  # ‖(3, 0, 4)‖ = 5
    assert torch.allclose(scaled[0], torch.tensor([1.2])) and torch.allclose(scaled[1], torch.tensor([[0.0, 1.6]]))


def test_vaccine_objective_equals_hand_computation():
    """y = w2·(w1·x), loss y², perturbed at both layers' outputs. At x = 1, w1 = 2, w2 = 3: h = 2, y = 6, the
    gradients at (h, y) are (2y·w2, 2y) = (36, 12), of norm 12√10, so ρ = 2 adds (6, 2)/√10 and
    y' = 3·(2 + 6/√10) + 2/√10 = 6 + 2√10; the perturbation is a constant, so ∂y'²/∂w1 = 2y'·w2·x."""
    first, second = scalar_linear(2.0), scalar_linear(3.0)
    x = torch.ones(1, 1)
    loss = perturbed_loss(lambda: second(first(x)).pow(2).sum(), [first, second], rho=2.0)
    y = 6 + 2 * math.sqrt(10)
    assert loss.item() == pytest.approx(y**2, rel=1e-6)
    loss.backward()
    assert first.weight.grad.item() == pytest.approx(2 * y * 3, rel=1e-6)
    assert second.weight.grad.item() == pytest.approx(2 * y * (2 + 6 / math.sqrt(10)), rel=1e-6)
    assert not first._forward_hooks and not second._forward_hooks  # the hooks are gone


def test_booster_objective_equals_hand_computation():
    """h(w) = ½‖w‖² at w = (3, 4): ∇h = w, r = ‖w‖ = 5, h(w − α·w/r) = ½(r − α)², so the regulariser is
    αr − α²/2 and its gradient ∇h(w) − ∇h(w − α·w/r) = α·w/r. With f(w) = Σw and λ = 5, α = 0.1:
    7 + 5·0.495 and gradient 1 + 5·0.1·(0.6, 0.8)."""
    params = [torch.tensor([3.0], requires_grad=True), torch.tensor([4.0], requires_grad=True)]
    regulariser = booster_regulariser(params, lambda: sum(p.pow(2).sum() for p in params) / 2, alpha=0.1)
    assert [p.item() for p in params] == [3.0, 4.0]  # the weights are restored exactly
    loss = sum(p.sum() for p in params) + 5.0 * regulariser
    assert loss.item() == pytest.approx(7 + 5 * (0.1 * 5 - 0.1**2 / 2), rel=1e-6)
    loss.backward()
    assert [p.grad.item() for p in params] == pytest.approx([1 + 5 * 0.06, 1 + 5 * 0.08], rel=1e-6)


def test_gaussian_mmd_equals_hand_computation():
    """One point each, at 0 and 1: the mean squared distance of distinct rows is 1, so the bandwidths are
    1/4, 1/2, 1, 2, 4; K(0, 0) = 5 and K(0, 1) = Σ exp(−1/σ), so MMD = 5 + 5 − 2·K(0, 1)."""
    cross = sum(math.exp(-1 / s) for s in (0.25, 0.5, 1, 2, 4))
    assert gaussian_mmd(torch.zeros(1, 1), torch.ones(1, 1)).item() == pytest.approx(10 - 2 * cross, rel=1e-6)


def test_repnoise_objective_equals_hand_computation():
    """Retain NLL 2; harmful NLLs 1 (final layer), 2 and 3 (two hidden states): log(1 + 6/2); noise MMDs 0.5 and
    1.5: mean 1. With α = 1, β = 0.001: 2 + 0.001 − log 4."""
    loss = repnoise_loss(torch.tensor(2.0), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, 1.5]), 1.0, 0.001)
    assert loss.item() == pytest.approx(2 + 0.001 - math.log(4), rel=1e-6)


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Each defense as the align stage of a `method=none` run (the aligned base evaluated), one store."""
    root = tmp_path_factory.mktemp("defenses")
    runs = {}
    for name in ("vaccine", "booster", "repnoise"):
        harmful = [] if name == "vaccine" else ["align.method.harmful.n=64"]
        runs[name] = run_safety_lab(
            "+debug=fast",
            "method=none",
            f"+method@align.method={name}",
            "+dataset@align.dataset=safety_sft",
            *SMALL,
            *harmful,
            f"hydra.run.dir={root / name}",
            store=root / "store",
        )
    return root, runs


def stored_adapters(store: Path) -> dict[str, dict]:
    """{method name: manifest} of the store's adapters."""
    manifests = [json.loads(p.read_text()) for p in (store / "adapter").glob("*/manifest.json")]
    return {m["recipe"]["method"]["name"]: m for m in manifests}


@pytest.mark.parametrize("name", ["vaccine", "booster", "repnoise"])
def test_each_defense_trains_as_the_align_stage(aligned, name):
    root, runs = aligned
    assert runs[name].returncode == 0, runs[name].stderr[-3000:]
    assert (
        0 <= json.loads((root / name / "metrics.json").read_text())["base.harmful/refusal_rate"] <= 1
    )  # the aligned base
    manifest = stored_adapters(root / "store")[name]
    assert math.isfinite(manifest["metrics"]["train/loss"])
    if name != "vaccine":  # the harmful data is in the recipe
        assert manifest["recipe"]["method"]["harmful"]["seed"] == 1  # dataset/harmful_ft


def test_booster_on_a_real_model_with_file_data(tiny_hf_model, tmp_path):
    """Alignment on PKU-SafeRLHF's safe answers, harmful data its unsafe ones (the rejected sides of the pairs)."""
    pairs = FIX / "pku_saferlhf.jsonl"
    result = run_safety_lab(
        "model=hf",
        f"model.path={tiny_hf_model}",
        "method=none",
        "eval=advbench",
        f"eval.suites.advbench.path={FIX / 'advbench.csv'}",
        "eval.n=2",
        "eval.max_new_tokens=4",
        "+method@align.method=booster",
        "+dataset@align.dataset=pku_saferlhf",
        f"align.dataset.path={pairs}",
        "dataset@align.method.harmful=pku_saferlhf",
        f"align.method.harmful.path={pairs}",
        "align.method.epochs=1",
        "trainer.enable_checkpointing=false",
        f"hydra.run.dir={tmp_path / 'run'}",
        store=tmp_path / "store",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = stored_adapters(tmp_path / "store")["booster"]
    assert math.isfinite(manifest["metrics"]["train/loss"]) and manifest["recipe"]["method"]["harmful"]["preferences"]


@pytest.mark.parametrize(
    "overrides, line",
    [
        (["+method@align.method=vaccine", "align.method.rho=0"], "align.method.rho=0.0: must be > 0"),
        (["+method@align.method=booster", "align.method.lamb=-5"], "align.method.lamb=-5.0: must be >= 0"),
        (["+method@align.method=repnoise", "align.method.beta=0"], "align.method.beta=0.0: must be > 0"),
    ],
)
def test_bad_settings_are_one_line_and_train_nothing(overrides, line, tmp_path):
    result = run_safety_lab(
        "+debug=fast", "method=none", *overrides, "+dataset@align.dataset=safety_sft", store=tmp_path / "store"
    )
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {line}", result.stderr
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("manifest.json"))
