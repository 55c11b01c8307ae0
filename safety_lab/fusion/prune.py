"""Antidote (Huang et al. 2025): one-shot pruning of the fine-tuned weights most important to harmful data.

Pure functions over named fp32 tensors, as Antidote's code computes them: the Wanda score of a weight W[i, j] is
|W[i, j]|·‖X_j‖₂ (X_j the j-th input feature over every token of the harmful data; the caller passes Σ x_j², since
a per-row ranking does not change with the sample count), and in every row i the `ratio` share of entries with the
highest scores (the paper's dense ratio, 0.1: cols − ⌊cols·(1 − ratio)⌋ of them, by a stable ascending sort) is set to
zero. For a LoRA stage these are the adapter's own factors (`.lora_A`, whose inputs are the layer's, and `.lora_B`,
whose inputs are A·x), as Antidote prunes its LoRA modules; `methods/antidote.py` gathers the sums with forward hooks.
"""

from __future__ import annotations

import torch

from safety_lab.fusion.merges import TaskVector


def wanda_scores(weight: torch.Tensor, input_sq_sums: torch.Tensor) -> torch.Tensor:
    """|W[i, j]|·√(Σ x_j²) for a weight of shape (out, in) and the summed squared inputs of shape (in,)."""
    return weight.float().abs() * input_sq_sums.float().sqrt().reshape(1, -1)


def harmful_mask(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """1 on the `ratio` share of highest scores in each row (cols − ⌊cols·(1 − ratio)⌋ entries), 0 elsewhere."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    keep = int(scores.shape[1] * (1 - ratio))
    mask = torch.ones_like(scores)
    mask.scatter_(1, torch.sort(scores, dim=-1, stable=True).indices[:, :keep], 0)
    return mask


def antidote(weights: TaskVector, input_sq_sums: TaskVector, ratio: float) -> tuple[TaskVector, dict[str, float]]:
    """Every weight with its harmful mask zeroed (a new vector), and the share of entries pruned per weight."""
    missing = sorted(set(weights) - set(input_sq_sums))
    if missing:
        raise ValueError(f"antidote: no input statistics for {missing[:3]}")
    pruned, shares = {}, {}
    for k, w in weights.items():
        mask = harmful_mask(wanda_scores(w, input_sq_sums[k]), ratio)
        pruned[k], shares[k] = w.float() * (1 - mask), mask.mean().item()
    return pruned, shares
