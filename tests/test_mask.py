"""Concrete masks: the sample formula, rescaling, every export mode on hand-made logits, save/load, and the masked
policy of mask-DPO against the formula W0 + λ·Σ m ⊙ τ / mean(m) on a tiny real Llama (gradients reach the logits)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import build_tiny_llama

from safety_lab.fusion.mask import ConcreteMask, export_mask, factor_deltas, relaxed_bernoulli, rescaled
from safety_lab.fusion.task_vectors import lora_factors, lora_task_vector
from safety_lab.methods.mask_dpo import MaskedPolicy, density_per_layer
from safety_lab.models.lora import attach_lora


def test_relaxed_bernoulli_is_the_concrete_formula():
    logits = torch.tensor([0.0, 2.0, -1.0])
    u = torch.rand(3, generator=torch.Generator().manual_seed(3)).clamp(1e-6, 1 - 1e-6)
    expected = torch.sigmoid((logits + torch.log(u) - torch.log(1 - u)) / 0.5)
    assert torch.allclose(relaxed_bernoulli(logits, 0.5, torch.Generator().manual_seed(3)), expected)


def test_rescaled_divides_by_the_mean_of_the_mask():
    tau, mask = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([1.0, 0.0, 1.0, 0.0])
    assert rescaled(tau, mask).tolist() == [2.0, 0.0, 6.0, 0.0]
    assert rescaled(tau, torch.zeros(4)).tolist() == [0.0] * 4


def test_export_modes():
    logits = torch.tensor([[2.0, -1.0], [0.5, -3.0]])
    assert torch.allclose(export_mask(logits, "expected"), torch.sigmoid(logits))
    assert export_mask(logits, "threshold").tolist() == [[1.0, 0.0], [1.0, 0.0]]
    assert export_mask(logits, "topk", top_k=0.25).tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert export_mask(logits, "topk", top_k=0.75).tolist() == [[1.0, 1.0], [1.0, 0.0]]
    sample = export_mask(logits, "sample", seed=7)
    assert torch.equal(sample, export_mask(logits, "sample", seed=7)) and set(sample.flatten().tolist()) <= {0.0, 1.0}
    big = torch.full((20_000,), 1.0)  # σ(1) = 0.731
    assert export_mask(big, "sample").mean().item() == pytest.approx(0.731, abs=0.01)
    with pytest.raises(ValueError, match="unknown mask export"):
        export_mask(logits, "soft")


def test_mask_save_load_and_density(tmp_path):
    mask = ConcreteMask({"layers.0.q.weight": torch.Size([2, 2]), "layers.1.q.weight": torch.Size([4])}, init_logit=0.0)
    with torch.no_grad():
        mask.logits[1].copy_(torch.tensor([10.0, 10.0, -10.0, -10.0]))
    mask.save(tmp_path)
    loaded = ConcreteMask.load(tmp_path)
    assert loaded.names == mask.names and torch.equal(loaded.logits[1], mask.logits[1])
    density = loaded.density()
    assert density["layers.0.q.weight"] == pytest.approx(0.5) and density["layers.1.q.weight"] == pytest.approx(0.5)
    shapes = {n: t.shape for n, t in loaded.named_logits().items()}
    per_layer = density_per_layer({"layers.0.q.weight": 0.25, "layers.1.q.weight": 1.0}, shapes)
    assert per_layer == {"mask/density_layer0": 0.25, "mask/density_layer1": 1.0}


@pytest.fixture()
def lora_model():
    model = build_tiny_llama(vocab_size=50)
    peft = attach_lora(copy.deepcopy(model), r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    with torch.no_grad():  # a trained-looking adapter: B ≠ 0
        for name, p in peft.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
    return model, peft


def test_masked_policy_equals_the_formula_and_trains_only_the_logits(lora_model):
    model, peft = lora_model
    tau = lora_task_vector(peft)
    mask = ConcreteMask({n: t.shape for n, t in tau.items()}, init_logit=0.0)
    fixed = {
        n: torch.bernoulli(torch.full(t.shape, 0.5), generator=torch.Generator().manual_seed(1)) for n, t in tau.items()
    }
    policy = MaskedPolicy(model, [tau, tau], weight=0.5, mask=mask)  # task arithmetic of two copies = τ itself
    ids = torch.randint(4, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    attention = torch.ones_like(ids)
    policy.masks = fixed
    logits = policy(ids, attention).logits

    by_hand = copy.deepcopy(model)
    with torch.no_grad():
        params = dict(by_hand.named_parameters())
        for name, t in tau.items():
            params[name] += t * fixed[name] / fixed[name].mean()
    assert torch.allclose(logits, by_hand(input_ids=ids, attention_mask=attention).logits, atol=1e-5)
    policy.masks = policy.ones()  # the unmasked fine-tuned model: base + τ
    assert torch.allclose(
        policy(ids, attention).logits, peft(input_ids=ids, attention_mask=attention).logits, atol=1e-5
    )

    policy.masks = None  # training: a fresh Concrete sample, differentiable w.r.t. the logits only
    policy(ids, attention).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mask.logits)
    assert all(p.grad is None for p in model.parameters())
    merged = MaskedPolicy(copy.deepcopy(model), [tau]).merge(fixed)
    assert torch.allclose(merged(input_ids=ids, attention_mask=attention).logits, logits, atol=1e-5)


def test_factor_space_masks_a_and_b_separately(lora_model):
    _, peft = lora_model
    factors = {k: v * 2.0 if k.endswith(".lora_B") else v for k, v in lora_factors(peft).items()}  # scaling 8/4
    dense = lora_task_vector(peft)
    ones = {k: torch.ones_like(v) for k, v in factors.items()}
    for name, delta in factor_deltas({k: rescaled(v, ones[k]) for k, v in factors.items()}).items():
        assert torch.allclose(delta, dense[name], atol=1e-6)
    name = next(iter(dense))
    half = {k: (torch.arange(v.numel()) % 2).float().view_as(v) for k, v in factors.items()}
    a, b = factors[f"{name}.lora_A"], factors[f"{name}.lora_B"]
    ma, mb = half[f"{name}.lora_A"], half[f"{name}.lora_B"]
    expected = (b * mb / mb.mean()) @ (a * ma / ma.mean())
    assert torch.allclose(
        factor_deltas({k: rescaled(v, half[k]) for k, v in factors.items()})[name], expected, atol=1e-6
    )


def test_shared_mask_under_ties_inside_the_forward(lora_model):
    from safety_lab.fusion.merges import ties

    model, peft = lora_model
    tau = lora_task_vector(peft)
    other = {n: -0.5 * t + 0.01 for n, t in tau.items()}
    mask = ConcreteMask({n: t.shape for n, t in tau.items()})
    policy = MaskedPolicy(model, [tau, other], weight=0.7, mask=mask, merge="ties", merge_args={"density": 0.5})
    fixed = {
        n: torch.bernoulli(torch.full(t.shape, 0.5), generator=torch.Generator().manual_seed(2)) for n, t in tau.items()
    }
    # through the merge registry: each masked vector at weight 1, λ = 0.7 scales the merged vector
    expected = ties(
        [{n: rescaled(t[n], fixed[n]) for n in t} for t in (tau, other)], [1.0, 1.0], density=0.5, scale=0.7
    )
    deltas = policy.deltas(fixed)
    assert all(torch.allclose(deltas[n], expected[n]) for n in tau)
    ids = torch.randint(4, 50, (1, 5), generator=torch.Generator().manual_seed(0))
    policy(ids, torch.ones_like(ids)).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mask.logits)
