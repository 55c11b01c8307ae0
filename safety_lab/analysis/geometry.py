"""The math of the mechanistic analyses (Jain et al. 2024; Arditi et al. 2024) as pure functions on tensors.

Activations are `[n, d]` float tensors, labels are `[n]` bools (True = unsafe). Weights follow `nn.Linear`:
`[out, in]`, so left singular vectors live in the layer's output space (column space) and right singular vectors
in its input space (row space), where the activations that enter the layer live.
"""

from __future__ import annotations

import torch


def cluster_distances(x: torch.Tensor, mean: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-sample cosine similarity to and L2 distance from a cluster mean."""
    return {"cosine": torch.nn.functional.cosine_similarity(x, mean[None], dim=1), "l2": (x - mean[None]).norm(dim=1)}


def silhouette(x: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean silhouette (euclidean) of the given labels: s = (b − a) / max(a, b) per sample, where a is the mean
    distance to the rest of its own cluster and b the mean distance to the nearest other cluster."""
    labels = torch.as_tensor(labels)
    classes = labels.unique()
    if not 2 <= len(classes) <= len(labels) - 1:
        raise ValueError(f"silhouette needs 2..n-1 labels, got {len(classes)} for {len(labels)} samples")
    dist = torch.cdist(x.double(), x.double())
    member = torch.stack([labels == c for c in classes], dim=1).double()  # [n, k]
    sums, counts = dist @ member, member.sum(0)
    own = member.bool()
    a = sums[own] / (counts.expand_as(sums)[own] - 1).clamp(min=1)
    b = sums.div(counts).masked_fill(own, float("inf")).min(dim=1).values
    s = (b - a) / torch.maximum(a, b)
    singletons = counts.expand_as(sums)[own] == 1  # sklearn's convention: 0 for a cluster of one
    return float(s.masked_fill(singletons, 0.0).mean())


def logistic_regression(x: torch.Tensor, y: torch.Tensor, l2: float) -> torch.Tensor:
    """Weights (last: the bias) of an L2-regularised logistic regression of `y` on `x`, fitted by LBFGS."""
    w = torch.zeros(x.shape[1] + 1, dtype=torch.double, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=50, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w[:-1] + w[-1], y) + l2 * w[:-1].square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w


def probe_accuracy(x: torch.Tensor, labels: torch.Tensor, folds: int = 2, l2: float = 1e-2, seed: int = 0) -> float:
    """Held-out accuracy of a logistic-regression probe (standardised features, LBFGS), averaged over k folds."""
    y = torch.as_tensor(labels).double()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    correct = 0
    for fold in range(folds):
        test = order[fold::folds]
        train = order[torch.arange(len(order)) % folds != fold]
        xt = x[train].double()
        mu, sd = xt.mean(0), xt.std(0).clamp(min=1e-8)
        w = logistic_regression((xt - mu) / sd, y[train], l2)
        with torch.no_grad():
            predicted = ((x[test].double() - mu) / sd) @ w[:-1] + w[-1] > 0
        correct += int((predicted == y[test].bool()).sum())
    return correct / len(y)


def pca_2d(x: torch.Tensor) -> torch.Tensor:
    """Coordinates of the samples on their top two principal components."""
    centred = x.double() - x.double().mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ vh[:2].T).float()


def energy_rank(singular_values: torch.Tensor, energy: float = 0.9) -> int:
    """Smallest k whose top-k singular values hold at least `energy` of Σσ²."""
    share = singular_values.double().square().cumsum(0) / singular_values.double().square().sum()
    return int((share < energy - 1e-12).sum()) + 1


def column_space_sines(w_tuned: torch.Tensor, w_pre: torch.Tensor, energy: float = 0.9) -> torch.Tensor:
    """sin of the angle between each top left singular vector of `w_tuned` (top-k by `energy`) and the pretrained
    weight's top-k column space: ‖u − P_pre u‖ for unit u."""
    u_pre, s_pre, _ = torch.linalg.svd(w_pre.double(), full_matrices=False)
    u_ft, s_ft, _ = torch.linalg.svd(w_tuned.double(), full_matrices=False)
    basis = u_pre[:, : energy_rank(s_pre, energy)]
    top = u_ft[:, : energy_rank(s_ft, energy)]
    return (top - basis @ (basis.T @ top)).norm(dim=0).clamp(max=1.0).float()


def row_space_projections(delta: torch.Tensor, x: torch.Tensor, k: int) -> torch.Tensor:
    """[n, k]: σ_j · |cos(x, v_j)| of each activation on the top-k right singular vectors v_j of ΔW = W_ft − W_pre —
    how strongly the update acts on that input."""
    _, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    cos = torch.nn.functional.normalize(x.double(), dim=1) @ vh[:k].T
    return (s[:k] * cos.abs()).float()


def difference_of_means(x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Arditi et al.'s candidate refusal direction: mean(unsafe) − mean(safe)."""
    labels = torch.as_tensor(labels).bool()
    return x[labels].double().mean(0).float() - x[~labels].double().mean(0).float()


def ablate(x: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """x − (x·r̂) r̂ over the last dimension: removes the direction's component and nothing else."""
    r = direction / direction.norm()
    return x - (x @ r)[..., None] * r


def refusal_score(logits: torch.Tensor, refusal_ids: list[int]) -> torch.Tensor:
    """log P(refusal) − log(1 − P(refusal)), P summed over the refusal tokens, from next-token logits [n, vocab]."""
    logp = logits.double().log_softmax(-1)
    p_log = logp[:, refusal_ids].logsumexp(-1)
    return (p_log - torch.log1p(-p_log.exp().clamp(max=1 - 1e-12))).float()
