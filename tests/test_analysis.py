"""The mechanistic analyses on constructed tensors (hand-computed answers) and on a tiny random Llama."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer

from safety_lab.analysis import geometry as g
from safety_lab.analysis.attacks import _layout, logit_gradient_norms, mean_embedding_norm, soft_token_attack
from safety_lab.analysis.hooks import activations, steer
from safety_lab.data.template import PromptTemplate


def test_silhouette_of_planted_clusters_matches_hand_computation():
    x = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    labels = torch.tensor([False, False, True, True])
    # point 0: a = 1, b = (10 + 11) / 2 = 10.5 → s = 9.5 / 10.5; point 1: a = 1, b = 9.5 → 8.5 / 9.5; symmetric
    expected = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert g.silhouette(x, labels) == pytest.approx(expected)
    # a cluster of one scores 0 (sklearn's convention); labels that cut across the clusters score below 0
    assert g.silhouette(torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0, 0, 1])) == pytest.approx(
        (4.0 / 5.0 + 3.0 / 4.0) / 3
    )
    assert g.silhouette(x, torch.tensor([False, True, False, True])) < 0
    with pytest.raises(ValueError, match="2..n-1"):
        g.silhouette(x, torch.zeros(4))


def test_probe_separates_planted_clusters_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(200) % 2 == 0
    x = torch.randn(200, 8, generator=gen)
    assert g.probe_accuracy(x, labels) < 0.65  # labels carry no information about x
    x[labels, 3] += 4.0  # planted along one direction
    assert g.probe_accuracy(x, labels) > 0.95


def test_cluster_distances_and_difference_of_means():
    x = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    d = g.cluster_distances(x, torch.tensor([3.0, 0.0]))
    assert d["l2"].tolist() == pytest.approx([4.0, math.sqrt(10)])
    assert d["cosine"].tolist() == pytest.approx([0.6, 0.0])
    r = g.difference_of_means(torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 0.0]]), torch.tensor([1, 1, 0]))
    assert r.tolist() == [2.0, 1.0]


def test_column_space_sines_of_a_known_rotation():
    """W_pre spans e1, e2 (energy 0.9 keeps exactly both); rotate e2 towards e3 by θ: sines are (0, sin θ)."""
    theta = 0.3
    w_pre = torch.zeros(5, 4)
    w_pre[0, 0], w_pre[1, 1] = 3.0, 2.0
    w_ft = w_pre.clone()
    w_ft[1, 1], w_ft[2, 1] = 2.0 * math.cos(theta), 2.0 * math.sin(theta)
    assert g.energy_rank(torch.tensor([3.0, 2.0, 0.1])) == 2
    sines = g.column_space_sines(w_ft, w_pre)
    assert sines.tolist() == pytest.approx([0.0, math.sin(theta)], abs=1e-6)
    assert g.column_space_sines(w_pre, w_pre).abs().max() < 1e-6


def test_row_space_projections_weigh_inputs_by_the_update():
    delta = torch.zeros(3, 4)
    delta[0, 1] = 5.0  # ΔW reads only input coordinate 1, with singular value 5
    x = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]])
    proj = g.row_space_projections(delta, x, k=1)
    assert proj[:, 0].tolist() == pytest.approx([5.0, 0.0, 5.0 / math.sqrt(2)])


def test_ablation_removes_a_planted_direction_exactly():
    gen = torch.Generator().manual_seed(1)
    r = torch.randn(6, generator=gen)
    other = torch.randn(10, 6, generator=gen)
    other = g.ablate(other, r)  # orthogonal to r
    x = other + torch.randn(10, 1, generator=gen) * r  # plant r with random coefficients
    out = g.ablate(x, 3.0 * r)  # the scale of the direction is irrelevant
    assert (out @ r).abs().max() < 1e-5
    assert torch.allclose(out, other, atol=1e-5)


def test_refusal_score_is_the_log_odds_of_the_refusal_tokens():
    logits = torch.log(torch.tensor([[0.2, 0.3, 0.5]]))
    assert g.refusal_score(logits, [0, 1]).item() == pytest.approx(0.0, abs=1e-6)  # P = 0.5
    assert g.refusal_score(logits, [2, 1]).item() == pytest.approx(math.log(0.8 / 0.2), abs=1e-5)


def test_pca_2d_recovers_the_dominant_axes():
    x = torch.zeros(4, 3)
    x[:, 2] = torch.tensor([-3.0, -1.0, 1.0, 3.0])
    x[:, 0] = torch.tensor([0.5, -0.5, -0.5, 0.5])
    coords = g.pca_2d(x)
    assert coords[:, 0].abs().tolist() == pytest.approx([3.0, 1.0, 1.0, 3.0], abs=1e-5)
    assert coords[:, 1].abs().tolist() == pytest.approx([0.5] * 4, abs=1e-5)


# ---- on a tiny real Llama -------------------------------------------------------------------------------------
PROMPTS = ["what is two plus two", "tell me a joke about computers", "how many legs does a spider have"]


@pytest.fixture(scope="module")
def tiny():
    tokenizer = build_tiny_tokenizer()
    return build_tiny_llama(len(tokenizer), seed=0).eval(), tokenizer


def test_activations_are_taken_at_each_prompts_own_last_token(tiny):
    model, tokenizer = tiny
    acts, logits = activations(model, tokenizer, PromptTemplate(), PROMPTS, batch_size=2, inputs=("gate_proj",))
    assert acts["mlp_hidden"].shape == (2, 3, 64) and acts["resid"].shape == (2, 3, 32)
    for i, prompt in enumerate(PROMPTS):  # one prompt alone, no padding, last position
        alone, alone_logits = activations(model, tokenizer, PromptTemplate(), [prompt], inputs=("gate_proj",))
        for site in acts:
            assert torch.allclose(acts[site][:, i], alone[site][:, 0], atol=1e-5)
        assert torch.allclose(logits[i], alone_logits[0], atol=1e-4)
    layer = model.model.layers[1].mlp  # the hidden activation is act(gate)·up of the recorded MLP input
    x = acts["gate_proj"][1]
    assert torch.allclose(acts["mlp_hidden"][1], layer.act_fn(layer.gate_proj(x)) * layer.up_proj(x), atol=1e-5)


def test_steer_ablate_leaves_no_trace_of_the_direction_in_the_residual_stream(tiny):
    model, tokenizer = tiny
    r = torch.randn(32, generator=torch.Generator().manual_seed(0))
    before, _ = activations(model, tokenizer, PromptTemplate(), PROMPTS)
    assert (before["resid"][1:] @ r).abs().min() > 1e-3
    with steer(model, r, "ablate"):
        ablated, _ = activations(model, tokenizer, PromptTemplate(), PROMPTS)
    assert (ablated["resid"] @ (r / r.norm())).abs().max() < 1e-4
    with steer(model, r, "add", layer=1, coefficient=2.0):
        added, _ = activations(model, tokenizer, PromptTemplate(), PROMPTS)
    assert torch.allclose(added["resid"][0], before["resid"][0])  # layer 0 untouched
    after, _ = activations(model, tokenizer, PromptTemplate(), PROMPTS)
    assert torch.allclose(after["resid"], before["resid"])  # hooks removed on exit


def test_logit_gradient_norms_match_a_per_prompt_backward(tiny):
    model, tokenizer = tiny
    norms = logit_gradient_norms(model, tokenizer, PromptTemplate(), PROMPTS)
    ids = tokenizer(PROMPTS[1], return_tensors="pt")["input_ids"]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_()
    model(inputs_embeds=embeds).logits[0, -1].max().backward()
    assert norms[1].item() == pytest.approx(embeds.grad.norm().item(), rel=1e-4)


@pytest.mark.parametrize("n_tokens", [1, 3])
def test_soft_token_attack_honours_n_and_its_norm_bound_and_lowers_the_loss(tiny, n_tokens):
    model, tokenizer = tiny
    targets = ["the sea is wide", "a spider has eight legs", "red yellow and blue"]
    bound = 0.5 * mean_embedding_norm(model)
    start = soft_token_attack(model, tokenizer, PromptTemplate(), PROMPTS, targets, n_tokens, steps=0, bound=bound)
    result = soft_token_attack(
        model, tokenizer, PromptTemplate(), PROMPTS, targets, n_tokens, steps=20, bound=bound, report_at=(5,)
    )
    assert result["soft_tokens"].shape == (3, n_tokens, 32)
    # exactly n_tokens attended columns between each prompt's body and its last (cue) token, where the target starts
    ids, mask, labels, soft = _layout(tokenizer, PromptTemplate(), PROMPTS, targets, n_tokens)
    for i, prompt in enumerate(PROMPTS):
        body = tokenizer(prompt)["input_ids"]
        assert ids[i, soft - len(body) + 1 : soft].tolist() == body[:-1] and ids[i, soft + n_tokens] == body[-1]
        assert mask[i, soft : soft + n_tokens].all() and int((labels[i] != -100).nonzero()[0]) == soft + n_tokens
    assert result["soft_tokens"].norm(dim=-1).max() <= bound * (1 + 1e-5)
    assert result["soft_tokens"].norm(dim=-1).max() >= 0.9 * bound  # the steps are large enough to reach the bound
    assert result["loss"] < start["loss"]
    assert set(result["success"]) == {0, 5, 20}
    assert all(p.requires_grad for p in model.parameters())  # flags restored
