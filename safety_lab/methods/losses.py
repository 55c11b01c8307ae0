"""Training losses as pure functions of logits and labels (unit-tested against hand computations)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from safety_lab.data.collate import IGNORE


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token cross-entropy over the positions whose label is not IGNORE (the SFT loss), their mean or sum."""
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE, reduction=reduction
    )


# ---- preference and unlearning losses, over per-sequence log-probabilities -----------------------------------
def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each row's labelled tokens, how many there are).

    Gathers the label's logit and subtracts the log-partition, so no [batch, length, vocab] log-softmax is kept.
    """
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    mask = labels != IGNORE
    picked = logits.gather(-1, labels.masked_fill(~mask, 0).unsqueeze(-1)).squeeze(-1)
    token_logps = (picked - torch.logsumexp(logits, dim=-1)) * mask
    return token_logps.sum(-1), mask.sum(-1)


def normalise_logps(
    summed: torch.Tensor, counts: torch.Tensor, how: str = "sum", fixed_length: int | None = None
) -> torch.Tensor:
    """Summed log-probs as they are (`sum`: TRL, SOMF), per labelled token (`mean`), or divided by one fixed
    length for every row (`fixed`: Jain et al., T = 159)."""
    if how == "sum":
        return summed
    if how == "mean":
        return summed / counts.clamp(min=1)
    if how == "fixed":
        return summed / fixed_length
    raise ValueError(f"unknown log-prob normalisation {how!r}; choose sum, mean or fixed")


def dpo_margin(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    beta_rejected: float | None = None,
) -> torch.Tensor:
    """DPO's implicit reward margin β_c·(π_c − ref_c) − β_r·(π_r − ref_r), with β_r = β unless given."""
    beta_rejected = beta if beta_rejected is None else beta_rejected
    return beta * (policy_chosen - ref_chosen) - beta_rejected * (policy_rejected - ref_rejected)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    beta_rejected: float | None = None,
) -> torch.Tensor:
    """Sigmoid DPO: −mean log σ(β_c·(π_c − ref_c) − β_r·(π_r − ref_r)), with β_r = β unless given (Jain et al. use
    0.1 / 0.01)."""
    return -F.logsigmoid(
        dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, beta_rejected)
    ).mean()


def conservative_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    beta_rejected: float | None = None,
) -> torch.Tensor:
    """cDPO (Mitchell 2023, "A note on DPO with noisy preferences"): −mean[(1−ε)·log σ(m) + ε·log σ(−m)], m the DPO
    margin: DPO against labels flipped with probability ε (TRL's `label_smoothing` of its sigmoid loss before 1.0)."""
    margin = dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, beta_rejected)
    eps = label_smoothing
    return (-(1 - eps) * F.logsigmoid(margin) - eps * F.logsigmoid(-margin)).mean()


def robust_dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    label_smoothing: float = 0.1,
    beta_rejected: float | None = None,
) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024; TRL's `robust`): −mean[(1−ε)·log σ(m) − ε·log σ(−m)] / (1 − 2ε),
    the unbiased DPO loss under labels flipped with probability ε < 1/2, m the DPO margin."""
    margin = dpo_margin(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta, beta_rejected)
    eps = label_smoothing
    return ((-(1 - eps) * F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1 - 2 * eps)).mean()


def ipo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
) -> torch.Tensor:
    """IPO (Azar et al. 2024, eq. 17): mean((π_c − ref_c − (π_r − ref_r)) − 1/(2τ))², τ = β; TRL feeds it per-token
    mean log-probs (`logp: mean`)."""
    return (((policy_chosen - ref_chosen) - (policy_rejected - ref_rejected) - 1 / (2 * beta)) ** 2).mean()


def simpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, beta: float = 2.0, gamma_beta_ratio: float = 0.5
) -> torch.Tensor:
    """SimPO (Meng et al. 2024): −mean log σ(β·(ā_c − ā_r) − γ), ā per-token mean log-probs, no reference,
    γ = β·gamma_beta_ratio (TRL's CPOTrainer `simpo`, whose `simpo_gamma` is γ)."""
    return -F.logsigmoid(beta * (chosen - rejected - gamma_beta_ratio)).mean()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, stable on both sides of −log 2 (Mächler 2012); x = 0 is taken as the largest float
    below it, so a probability of exactly 1 gives a large finite odds instead of inf."""
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen: torch.Tensor, rejected: torch.Tensor, chosen_nll: torch.Tensor, odds_ratio_weight: float = 0.1
) -> torch.Tensor:
    """ORPO (Hong et al. 2024): NLL(chosen) − λ·mean log σ(log odds(ā_c) − log odds(ā_r)), odds(p) =
    p/(1−p) of the per-token mean log-probs ā, no reference (TRL's ORPOTrainer.odds_ratio_loss, β = λ)."""
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    return chosen_nll - odds_ratio_weight * F.logsigmoid(log_odds).mean()


def kto_reference_point(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor, average=None) -> torch.Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024; TRL): max(0, mean(log π − log π_ref)) over mismatched
    (prompt, completion) pairs, detached: an estimate of KL(π ‖ π_ref) that shifts the reward, not a gradient path.
    `average` combines the batch means of several processes before the clamp (TRL's gather)."""
    mean = (kl_logps - ref_kl_logps).mean().detach()
    return (mean if average is None else average(mean)).clamp(min=0)


def kto_loss(
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    reference_point: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> torch.Tensor:
    """KTO (Ethayarajh et al. 2024, eq. 7; TRL's KTOTrainer `kto`): mean over rows of λ_D·(1 − σ(β·(r − z₀))) for a
    desirable row and λ_U·(1 − σ(β·(z₀ − r))) for an undesirable one, r = log π − log π_ref."""
    reward = logps - ref_logps
    return torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (reward - reference_point))),
        undesirable_weight * (1 - torch.sigmoid(beta * (reference_point - reward))),
    ).mean()


def ascent_term(forget_nll: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """−mean NLL of the sequences to forget (gradient ascent); with `clamp`, a sequence whose NLL is past it stops
    contributing, so ascent cannot diverge."""
    return -(forget_nll if clamp is None else forget_nll.clamp(max=clamp)).mean()


def simnpo_term(forget_logps: torch.Tensor, beta: float = 2.5, gamma: float = 0.0) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): −(2/β)·mean log σ(−β·ā − γ) = (2/β)·mean softplus(β·ā + γ), ā = log π(y|x)/|y|
    the per-token mean log-prob of the sequence to forget: NPO without a reference, margin γ."""
    return 2.0 / beta * F.softplus(beta * forget_logps + gamma).mean()


def npo_term(forget_logps: torch.Tensor, ref_forget_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation: (2/β)·mean softplus(β·(log π − log π_ref)) = −(2/β)·mean log σ(−β·…)."""
    return 2.0 / beta * F.softplus(beta * (forget_logps - ref_forget_logps)).mean()


def unlearning_loss(
    retain_nll: torch.Tensor, forget: torch.Tensor, retain_weight: float = 1.0, forget_weight: float = 0.1
) -> torch.Tensor:
    """retain_weight · mean NLL(keep) + forget_weight · forget term. Gradient difference (Jain et al.) is
    1 · NLL(preferred) + 0.1 · ascent_term(dispreferred); pure gradient ascent has retain_weight 0."""
    return retain_weight * retain_nll.mean() + forget_weight * forget


# ---- representation losses ---------------------------------------------------------------------------------
def masked_mse(activations: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the hidden units of the positions where `mask` ([B, T]) is true (`target` broadcasts
    to [B, T, d]): `F.mse_loss` restricted to those positions."""
    mask = mask.unsqueeze(-1).float()
    squared = (activations.float() - target.float()) ** 2 * mask
    return squared.sum() / (mask.sum() * activations.shape[-1]).clamp(min=1)


def rmu_control_vector(hidden_size: int, steering_coeff: float = 6.5, generator=None) -> torch.Tensor:
    """RMU's target c·u (Li et al. 2024): u a unit vector drawn once, uniform on [0, 1)^d then normalised, as the WMDP
    code does."""
    u = torch.rand(hidden_size, generator=generator)
    return steering_coeff * u / u.norm()


def rmu_loss(
    forget: torch.Tensor,
    retain: torch.Tensor,
    frozen_retain: torch.Tensor,
    control: torch.Tensor,
    forget_mask: torch.Tensor,
    retain_mask: torch.Tensor,
    retain_weight: float = 1200.0,
) -> torch.Tensor:
    """RMU (Li et al. 2024, WMDP §5): mean‖h(x_f) − c·u‖²/d + α·mean‖h(x_r) − h_frozen(x_r)‖²/d, over the
    masked positions of one layer's output h, c·u fixed (`rmu_control_vector`), α = retain_weight."""
    return masked_mse(forget, control, forget_mask) + retain_weight * masked_mse(
        retain, frozen_retain.detach(), retain_mask
    )


# ---- pulls towards anchor weights (Lisa's proximal term, L2 towards the aligned weights) ------------------------
def l2_penalty(tensors, weight: float, anchors=None) -> torch.Tensor:
    """weight/2 · Σ_i ‖t_i − a_i‖²_F (a_i = 0 without `anchors`): Lisa's proximal term ρ/2·‖w − w_anchor‖² over the
    trainable weights, and sft_l2's λ/2·‖W − W_aligned‖² over each adapted layer's ΔW."""
    anchors = anchors if anchors is not None else [None] * len(tensors)
    total = sum((t.float() - (a.float() if a is not None else 0)).pow(2).sum() for t, a in zip(tensors, anchors))
    return weight / 2 * torch.as_tensor(total)
