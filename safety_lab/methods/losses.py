"""Training losses as pure functions of logits and labels (unit-tested against hand computations)."""

from __future__ import annotations

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
    beta_rejected = beta if beta_rejected is None else beta_rejected
    margin = beta * (policy_chosen - ref_chosen) - beta_rejected * (policy_rejected - ref_rejected)
    return -F.logsigmoid(margin).mean()


def ascent_term(forget_nll: torch.Tensor, clamp: float | None = None) -> torch.Tensor:
    """−mean NLL of the sequences to forget (gradient ascent); with `clamp`, a sequence whose NLL is past it stops
    contributing, so ascent cannot diverge."""
    return -(forget_nll if clamp is None else forget_nll.clamp(max=clamp)).mean()


def npo_term(forget_logps: torch.Tensor, ref_forget_logps: torch.Tensor, beta: float = 0.1) -> torch.Tensor:
    """Negative preference optimisation: (2/β)·mean softplus(β·(log π − log π_ref)) = −(2/β)·mean log σ(−β·…)."""
    return 2.0 / beta * F.softplus(beta * (forget_logps - ref_forget_logps)).mean()


def unlearning_loss(
    retain_nll: torch.Tensor, forget: torch.Tensor, retain_weight: float = 1.0, forget_weight: float = 0.1
) -> torch.Tensor:
    """retain_weight · mean NLL(keep) + forget_weight · forget term. Gradient difference (Jain et al.) is
    1 · NLL(preferred) + 0.1 · ascent_term(dispreferred); pure gradient ascent has retain_weight 0."""
    return retain_weight * retain_nll.mean() + forget_weight * forget
