"""Merges of task vectors: pure functions over named fp32 tensors, and the `fusion.merge` registry.

A task vector maps a base parameter name to the ΔW it adds (see `task_vectors.py`). Every function here returns a
new task vector, never mutates its inputs, takes each hyperparameter explicitly and draws random numbers only from
a generator seeded by its `seed`. Vectors with different key sets are aligned on the union of keys, a missing key
counting as zero.

Conventions worth knowing:
- `lora_weighted` is the LoRA-fusion paper's λ: W = W0 + (1−λ)·ΔW_task + λ·ΔW_safety, exact in ΔW, which is what
  PEFT's `add_weighted_adapter(combination_type="cat")` builds with weights (1−λ, λ).
- `lora_linear` is PEFT's `linear`: it sums the *factors* A and B (each scaled by √|w·s|, the sign on A), so
  ΔW = (Σ_i √|w_i s_i| B_i)(Σ_j ±√|w_j s_j| A_j) carries cross terms B_i·A_j (i ≠ j) that no adapter trained;
  kept for comparison, never the default.
- `ties` and `dare` follow `peft.utils.merge_utils` exactly (per-tensor top-k, sign elected on the unweighted
  trimmed tensors, weights applied before the disjoint mean), plus SOMF's options: global top-k and disjoint sum.
  `ties(weighting="mergekit")` is mergekit's convention instead (weights applied before the sign election, the mean
  divided by the summed weights of the agreeing entries); PEFT's stays the default. Magnitude trimming keeps at
  least one entry of a tensor with fewer than 1/density entries, as mergekit does (PEFT zeroes it).
- `della`, `breadcrumbs`, `model_stock` and `slerp` equal mergekit's merges of the same name on task vectors
  (tests/test_merges.py), with its defaults, except where mergekit fails or zeroes: Breadcrumbs keeps at least one
  entry, a DELLA row of one entry is kept with probability density − ε. mergekit's `slerp` interpolates full weights
  W0 + τ; here, as every merge sees only task vectors, `slerp` interpolates the two task vectors.
- `safe_lora` uses Safe LoRA's C = V·Vᵀ/‖V‖_F (V the aligned-minus-unaligned weights), as its paper and code do.
- `safemerge` takes Safe LoRA's cosine per weight, with the `safety` input's update as V (as `safe_lora` here), and
  merges the layers below the threshold exactly in ΔW, (1−λ)·ΔW_task + λ·ΔW_safety, as the paper writes it; its code
  merges them with PEFT's `linear` (the factors averaged, so cross terms B_task·A_safety enter: see `lora_linear`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

TaskVector = dict[str, torch.Tensor]


# ---- building blocks -------------------------------------------------------------------------------------------
def _keys(vectors: Sequence[TaskVector]) -> list[str]:
    return list(dict.fromkeys(k for v in vectors for k in v))


def _stack(vectors: Sequence[TaskVector], key: str) -> torch.Tensor:
    like = next(v[key] for v in vectors if key in v)
    return torch.stack([v[key].float() if key in v else torch.zeros_like(like, dtype=torch.float32) for v in vectors])


def _weights(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    if len(weights) != stacked.shape[0]:
        raise ValueError(f"{stacked.shape[0]} task vectors but {len(weights)} weights")
    return torch.tensor(list(weights), dtype=stacked.dtype).view(-1, *([1] * (stacked.dim() - 1)))


def _check_rate(name: str, value: float, low_open: bool) -> None:
    if not (low_open and 0 < value <= 1 or not low_open and 0 <= value < 1):
        raise ValueError(f"{name} must be in {'(0, 1]' if low_open else '[0, 1)'}, got {value}")


def task_arithmetic(vectors: Sequence[TaskVector], weights: Sequence[float]) -> TaskVector:
    """Σ_i w_i·τ_i."""
    return {k: (_stack(vectors, k) * _weights(_stack(vectors, k), weights)).sum(0) for k in _keys(vectors)}


def lora_weighted(task: TaskVector, safety: TaskVector, weight: float, keep_task: bool = False) -> TaskVector:
    """(1−λ)·ΔW_task + λ·ΔW_safety; with `keep_task`, ΔW_task + λ·ΔW_safety."""
    return task_arithmetic([task, safety], [1.0 if keep_task else 1.0 - weight, weight])


def lora_linear(
    task: TaskVector, safety: TaskVector, scalings: tuple[float, float], weight: float, keep_task: bool = False
) -> TaskVector:
    """PEFT's `linear` combination of two equal-rank LoRAs given as factors (`<weight name>.lora_A` / `.lora_B`,
    as `task_vectors.lora_factors` returns them) with their scalings α/r: the dense ΔW of the averaged factors."""
    weights = [1.0 if keep_task else 1.0 - weight, weight]
    ws = [w * s for w, s in zip(weights, scalings)]
    root = [abs(x) ** 0.5 for x in ws]
    signed = [r if x >= 0 else -r for r, x in zip(root, ws)]
    out = {}
    for a_key in (k for k in _keys([task, safety]) if k.endswith(".lora_A")):
        b_key = a_key.removesuffix(".lora_A") + ".lora_B"
        a = task_arithmetic([{a_key: task[a_key]}, {a_key: safety[a_key]}], signed)[a_key]
        b = task_arithmetic([{b_key: task[b_key]}, {b_key: safety[b_key]}], root)[b_key]
        out[a_key.removesuffix(".lora_A")] = b @ a
    return out


def _magnitude_mask(stacked: torch.Tensor, density: float, gamma: float = 0.0) -> torch.Tensor:
    """1 on the top `density` share of |entries| of each row (one task vector per row; at least one entry, as
    mergekit keeps), after skipping its `gamma` share of largest ones as far as `density` leaves room (Breadcrumbs'
    outliers), 0 elsewhere."""
    flat = stacked.reshape(stacked.shape[0], -1)
    mask, n = torch.zeros_like(flat), flat.shape[1]
    k = min(n, max(1, int(density * n)))
    skip = min(int(gamma * n), n - k)
    for i in range(flat.shape[0]):
        mask[i, torch.topk(flat[i].abs(), k=skip + k, largest=True).indices[skip:]] = 1
    return mask.reshape(stacked.shape)


def _trimmed(vectors: Sequence[TaskVector], density: float, scope: str, gamma: float = 0.0) -> dict[str, torch.Tensor]:
    """Stacked task vectors per key, each keeping its top `density` share by magnitude (less its top `gamma`
    share) — per tensor, or across all of its tensors at once (`scope="global"`, SOMF's TIES)."""
    keys = _keys(vectors)
    stacks = {k: _stack(vectors, k) for k in keys}
    if density >= 1:
        return stacks
    if scope == "tensor":
        return {k: s * _magnitude_mask(s, density, gamma) for k, s in stacks.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    flat = torch.cat([s.reshape(s.shape[0], -1) for s in stacks.values()], dim=1)
    mask, start, out = _magnitude_mask(flat, density, gamma), 0, {}
    for k, s in stacks.items():
        size = s[0].numel()
        out[k] = s * mask[:, start : start + size].reshape(s.shape)
        start += size
    return out


def _elect_and_merge(
    stacked: torch.Tensor, weights: Sequence[float], majority: str, disjoint: str, weighting: str = "peft"
) -> torch.Tensor:
    """TIES' sign election and disjoint mean or sum of the weighted agreeing entries. `weighting="peft"`: the sign
    is elected on the unweighted vectors and the mean divides by the number of agreeing entries; `"mergekit"`: on
    the weighted vectors, and the mean divides by the summed weights of the agreeing entries (0 → 1)."""
    w = _weights(stacked, weights)
    if weighting not in ("peft", "mergekit"):
        raise ValueError(f"weighting must be 'peft' or 'mergekit', got {weighting!r}")
    voters = stacked * w if weighting == "mergekit" else stacked
    if majority == "total":
        magnitude = voters.sum(0)
    elif majority == "frequency":
        magnitude = voters.sign().sum(0)
    else:
        raise ValueError(f"majority must be 'total' or 'frequency', got {majority!r}")
    agree = voters.sign() == torch.where(magnitude >= 0, 1.0, -1.0)
    merged = (stacked * w * agree).sum(0)
    if disjoint == "sum":
        return merged
    if disjoint != "mean":
        raise ValueError(f"disjoint must be 'mean' or 'sum', got {disjoint!r}")
    if weighting == "peft":
        return merged / agree.sum(0).clamp(min=1)
    divisor = (w * agree).sum(0)
    return merged / torch.where(divisor == 0, 1.0, divisor)


def ties(
    vectors: Sequence[TaskVector],
    weights: Sequence[float],
    density: float = 0.2,
    scale: float = 1.0,
    majority: Literal["total", "frequency"] = "total",
    disjoint: Literal["mean", "sum"] = "mean",
    scope: Literal["tensor", "global"] = "tensor",
    weighting: Literal["peft", "mergekit"] = "peft",
) -> TaskVector:
    """TIES: trim each vector to its top `density` by magnitude, elect a sign per entry, merge the agreeing
    entries (mean or sum), times `scale` (SOMF: density 0.2, global scope, sum, scale 0.4). `weighting` (default
    "peft"; "mergekit": mergekit's `ties`) says where the weights enter, see `_elect_and_merge`."""
    _check_rate("density", density, low_open=True)
    return {
        k: scale * _elect_and_merge(s, weights, majority, disjoint, weighting)
        for k, s in _trimmed(vectors, density, scope).items()
    }


def _dropped(vectors: Sequence[TaskVector], density: float, rescale: bool, seed: int) -> dict[str, torch.Tensor]:
    """Stacked task vectors per key with each entry kept with probability `density` (Bernoulli, drawn key by key
    and vector by vector from one generator seeded `seed`), survivors divided by `density` when `rescale`."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for k in _keys(vectors):
        rows = []
        for row in _stack(vectors, k):
            kept = row * torch.bernoulli(torch.full_like(row, density), generator=generator)
            rows.append(kept / density if rescale else kept)
        out[k] = torch.stack(rows)
    return out


def dare(
    vectors: Sequence[TaskVector], weights: Sequence[float], drop_rate: float = 0.3, rescale: bool = True, seed: int = 0
) -> TaskVector:
    """DARE: drop each entry with probability `drop_rate`, rescale survivors by 1/(1−p), then Σ_i w_i·τ_i."""
    _check_rate("drop_rate", drop_rate, low_open=False)
    return {k: (s * _weights(s, weights)).sum(0) for k, s in _dropped(vectors, 1.0 - drop_rate, rescale, seed).items()}


def dare_ties(
    vectors: Sequence[TaskVector],
    weights: Sequence[float],
    drop_rate: float = 0.3,
    scale: float = 1.0,
    majority: Literal["total", "frequency"] = "total",
    disjoint: Literal["mean", "sum"] = "mean",
    seed: int = 0,
) -> TaskVector:
    """DARE's random drop and rescale, then TIES' sign election and disjoint merge, times `scale`."""
    _check_rate("drop_rate", drop_rate, low_open=False)
    return {
        k: scale * _elect_and_merge(s, weights, majority, disjoint)
        for k, s in _dropped(vectors, 1.0 - drop_rate, True, seed).items()
    }


def resta(task: TaskVector, safety: TaskVector, gamma: float) -> TaskVector:
    """Resta: the fine-tuned update plus γ times the safety vector (aligned − unaligned), in weight space."""
    return task_arithmetic([task, safety], [1.0, gamma])


def _safety_projection(task: TaskVector, aligned: TaskVector, merge: str) -> tuple[TaskVector, dict[str, float]]:
    """Safe LoRA's C·ΔW per weight, C = V·Vᵀ/‖V‖_F with V the aligned update, and cosine(C·ΔW, ΔW)."""
    projected, cosines = {}, {}
    for k, delta in task.items():
        if k not in aligned:
            raise ValueError(f"{merge}: no aligned update for {k}")
        v = aligned[k].float()
        projected[k] = (v @ v.T / torch.linalg.norm(v)) @ delta.float()
        cosines[k] = torch.nn.functional.cosine_similarity(
            projected[k].reshape(1, -1), delta.float().reshape(1, -1)
        ).item()
    return projected, cosines


def safe_lora(
    task: TaskVector, aligned: TaskVector, threshold: float | None = 0.5, num_layers: int | None = None
) -> tuple[TaskVector, dict[str, float]]:
    """Safe LoRA: per weight, C = V·Vᵀ/‖V‖_F with V the aligned update; ΔW is replaced by C·ΔW on the layers whose
    cosine(C·ΔW, ΔW) ≤ `threshold`, or on the `num_layers` least similar ones. Returns (vector, the cosines)."""
    if (threshold is None) == (num_layers is None):
        raise ValueError("set exactly one of threshold or num_layers")
    projected, cosines = _safety_projection(task, aligned, "safe_lora")
    if threshold is not None:
        chosen = {k for k, c in cosines.items() if c <= threshold}
    else:
        chosen = set(sorted(cosines, key=cosines.get)[:num_layers])
    return {k: projected[k] if k in chosen else delta.float().clone() for k, delta in task.items()}, cosines


def safemerge(
    task: TaskVector, safety: TaskVector, weight: float, threshold: float = 0.35
) -> tuple[TaskVector, dict[str, float]]:
    """SafeMERGE (Djuhera et al. 2025): per weight, the cosine of Safe LoRA (`_safety_projection`, V the safety
    update) decides; a weight whose cosine is below `threshold` becomes (1−λ)·ΔW_task + λ·ΔW_safety, any other keeps
    ΔW_task. Returns (vector, the cosines)."""
    _, cosines = _safety_projection(task, safety, "safemerge")
    merged = {
        k: lora_weighted({k: delta}, {k: safety[k]}, weight)[k] if cosines[k] < threshold else delta.float().clone()
        for k, delta in task.items()
    }
    return merged, cosines


def _l1_rescaled(kept: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """`kept` scaled to the L1 norm of `original` (mergekit's `rescale`), unless either norm is below 1e-7."""
    before, after = original.abs().sum(), kept.abs().sum()
    return kept if before < 1e-7 or after < 1e-7 else kept * (before / after)


def _check_breadcrumbs(density: float, gamma: float, **_) -> None:
    _check_rate("density", density, low_open=True)
    _check_rate("gamma", gamma, low_open=False)


def breadcrumbs(
    vectors: Sequence[TaskVector],
    weights: Sequence[float],
    density: float = 0.9,
    gamma: float = 0.01,
    scale: float = 1.0,
    rescale: bool = False,
) -> TaskVector:
    """Model Breadcrumbs (Davari & Belilovsky 2023), as mergekit's `breadcrumbs`: each vector keeps, per tensor, the
    `density` share of entries just below its `gamma` share of largest |entries| (the paper's β), optionally
    rescaled to its L1 norm; then scale·Σ_i w_i·τ_i."""
    _check_breadcrumbs(density, gamma)
    out = {}
    for k, s in _trimmed(vectors, density, "tensor", gamma).items():
        if rescale:
            s = torch.stack([_l1_rescaled(kept, row) for kept, row in zip(s, _stack(vectors, k))])
        out[k] = scale * (s * _weights(s, weights)).sum(0)
    return out


def _check_della(density: float, epsilon: float, **_) -> None:
    _check_rate("density", density, low_open=True)
    if density < 1 and not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"epsilon={epsilon}: density ± epsilon must lie in (0, 1) (density={density})")


def _magprune(
    tensor: torch.Tensor, density: float, epsilon: float, rescale: bool, generator: torch.Generator
) -> torch.Tensor:
    """DELLA's MAGPRUNE as mergekit's `della_magprune`: each entry kept with probability density − ε + 2ε·r, r its
    magnitude rank along dim 1 (a 1-d tensor: its only row) scaled to [0, 1]; survivors L1-rescaled (`rescale`)."""
    if density >= 1:
        return tensor
    rows = tensor if tensor.dim() >= 2 else tensor.unsqueeze(0)
    ranks = torch.argsort(rows.abs(), dim=1, descending=False).argsort(dim=1).float() + 1
    rank_norm = (ranks - 1) / max(rows.shape[1] - 1, 1)  # one entry per row (mergekit: NaN): density − ε
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    kept = rows * torch.bernoulli(probs, generator=generator)
    return (_l1_rescaled(kept, rows) if rescale else kept).reshape(tensor.shape)


def della(
    vectors: Sequence[TaskVector],
    weights: Sequence[float],
    density: float = 0.7,
    epsilon: float = 0.15,
    scale: float = 1.0,
    rescale: bool = True,
    majority: Literal["total", "frequency"] = "total",
    disjoint: Literal["mean", "sum"] = "mean",
    seed: int = 0,
) -> TaskVector:
    """DELLA (Deep et al. 2024), as mergekit's `della`: MAGPRUNE each vector (`_magprune`, drawn key by key and
    vector by vector from one generator seeded `seed`), then TIES' election on the weighted vectors and
    scale·Σ_i w_i·τ_i over agreeing entries / Σ_i w_i over them (`disjoint="sum"`: not divided)."""
    _check_della(density, epsilon)
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for k in _keys(vectors):
        s = torch.stack([_magprune(row, density, epsilon, rescale, generator) for row in _stack(vectors, k)])
        out[k] = scale * _elect_and_merge(s, weights, majority, disjoint, weighting="mergekit")
    return out


def model_stock(vectors: Sequence[TaskVector], scale: float = 1.0, filter_wise: bool = False) -> TaskVector:
    """Model Stock (Jang et al. 2024), as mergekit's `model_stock`: t·mean_i τ_i with t = k·cos θ / (1 + (k−1)·cos θ),
    cos θ the mean pairwise cosine of the k ≥ 2 task vectors, per tensor (or per row: `filter_wise`); t = 0 where
    |1 + (k−1)·cos θ| < 1e-6; times `scale`."""
    if len(vectors) < 2:
        raise ValueError(f"model_stock needs at least 2 task vectors, got {len(vectors)}")
    out, k = {}, len(vectors)
    for key in _keys(vectors):
        s = _stack(vectors, key)
        rows = s.reshape(k, -1) if not filter_wise else s.unsqueeze(1) if s.dim() == 2 else s
        cos = (
            torch.stack(
                [
                    ((a * b).sum(-1) / (torch.norm(a, dim=-1) * torch.norm(b, dim=-1)).clamp(min=1e-6)).clamp(-1, 1)
                    for i, a in enumerate(rows)
                    for b in rows[i + 1 :]
                ]
            )
            .mean(0)
            .unsqueeze(-1)
        )
        denominator = 1 + (k - 1) * cos
        singular = denominator.abs() < 1e-6
        t = torch.where(singular, 0.0, k * cos / torch.where(singular, 1.0, denominator))
        out[key] = scale * (t * rows.mean(0)).reshape(s.shape[1:])
    return out


def slerp(
    first: TaskVector, second: TaskVector, t: float, dot_threshold: float = 0.9995, eps: float = 1e-8
) -> TaskVector:
    """SLERP from `first` (t = 0) to `second` (t = 1), tensor by tensor as mergekit's `slerp`: with θ the angle
    between the two (flattened) tensors a and b, sin((1−t)θ)/sin θ·a + sin(tθ)/sin θ·b, or (1−t)·a + t·b where
    |cos θ| > `dot_threshold` (a norm ≤ `eps` counts as 1)."""
    out = {}
    for key in _keys([first, second]):
        s = _stack([first, second], key)
        a, b = s.reshape(2, -1)
        norm_a, norm_b = (
            torch.where(n > eps, n, 1) for n in (torch.linalg.vector_norm(a), torch.linalg.vector_norm(b))
        )
        dot = (a / norm_a * (b / norm_b)).sum().clamp(-1, 1)
        linear = dot.abs() > dot_threshold
        theta = torch.acos(torch.where(linear, 0, dot))
        coef_a = torch.where(linear, 1 - t, torch.sin((1 - t) * theta) / torch.sin(theta))
        coef_b = torch.where(linear, t, torch.sin(t * theta) / torch.sin(theta))
        out[key] = (coef_a * a + coef_b * b).reshape(s.shape[1:])
    return out


# ---- the registry (`fusion.merge`) --------------------------------------------------------------------------------
@dataclass(frozen=True)
class FusionInput:
    """One fused input: its dense ΔW, and for LoRA inputs its factors and scaling α/r; `weight` is its own
    coefficient in multi-vector merges (task arithmetic, TIES, DARE)."""

    delta: TaskVector
    factors: TaskVector | None = None
    scaling: float = 1.0
    weight: float = 1.0


@dataclass(frozen=True)
class Merge:
    """A registered merge: `fuse(inputs, weight, **args)` → ΔW to add to the model. `roles` names the inputs it
    needs (empty: any number, each with its own weight); `weight` says what `fusion.weight` means for it;
    `n_inputs` bounds how many inputs it takes (None: no upper bound); `check_args(**args)` raises a ValueError on
    out-of-range arguments, before anything loads."""

    name: str
    fuse: Callable[..., TaskVector]
    roles: tuple[str, ...]
    weight: str
    weight_range: tuple[float, float] = (float("-inf"), float("inf"))
    args: dict = field(default_factory=dict)
    n_inputs: tuple[int, int | None] = (1, None)
    check_args: Callable[..., None] | None = None

    def check(self, inputs: Sequence[str], weight: float, args: dict) -> None:
        """ValueError naming what is wrong with these inputs, weight or arguments."""
        missing = [r for r in self.roles if r not in inputs]
        if missing:
            raise ValueError(f"merge {self.name!r} needs inputs {list(self.roles)}, missing {missing}")
        if not inputs:
            raise ValueError(f"merge {self.name!r} needs at least one input")
        low, high = self.weight_range
        if not low <= weight <= high and not (args.get("keep_task") and weight >= low):
            raise ValueError(f"weight={weight} is outside [{low}, {high}] for merge {self.name!r} ({self.weight})")
        least, most = self.n_inputs
        if len(inputs) < least or most is not None and len(inputs) > most:
            takes = (
                f"exactly {least}" if least == most else f"at least {least}" if most is None else f"{least} to {most}"
            )
            raise ValueError(f"merge {self.name!r} takes {takes} inputs, got {len(inputs)}: {list(inputs)}")
        try:
            inspect.signature(self.fuse).bind(inputs, weight, **args)
        except TypeError as e:
            raise ValueError(f"merge {self.name!r}: {e}; its arguments are {sorted(self.args)}") from None
        if self.check_args is not None:
            self.check_args(**{**self.args, **args})


MERGES: dict[str, Merge] = {}


def merge_method(
    name: str,
    roles: tuple[str, ...] = (),
    weight: str = "λ: scales the merged vector",
    weight_range: tuple[float, float] = (float("-inf"), float("inf")),
    n_inputs: tuple[int, int | None] = (1, None),
    check_args: Callable[..., None] | None = None,
):
    """Register `fn(inputs: dict[str, FusionInput], weight: float, **args) -> TaskVector` as `fusion.merge=name`."""

    def register(fn):
        params = inspect.signature(fn).parameters
        args = {k: p.default for k, p in list(params.items())[2:]}
        MERGES[name] = Merge(name, fn, roles, weight, weight_range, args, n_inputs, check_args)
        return fn

    return register


def _deltas(inputs: dict[str, FusionInput]) -> tuple[list[TaskVector], list[float]]:
    return [i.delta for i in inputs.values()], [i.weight for i in inputs.values()]


@merge_method("lora_weighted", ("task", "safety"), "λ: the safety adapter's share, the task getting 1−λ", (0.0, 1.0))
def _lora_weighted(inputs, weight, keep_task: bool = False):
    return lora_weighted(inputs["task"].delta, inputs["safety"].delta, weight, keep_task)


@merge_method("lora_linear", ("task", "safety"), "λ: the safety adapter's share (PEFT `linear`)", (0.0, 1.0))
def _lora_linear(inputs, weight, keep_task: bool = False):
    task, safety = inputs["task"], inputs["safety"]
    return lora_linear(task.factors, safety.factors, (task.scaling, safety.scaling), weight, keep_task)


@merge_method("task_arithmetic")
def _task_arithmetic(inputs, weight):
    vectors, weights = _deltas(inputs)
    return task_arithmetic(vectors, [weight * w for w in weights])


@merge_method("ties")
def _ties(
    inputs,
    weight,
    density: float = 0.2,
    majority: str = "total",
    disjoint: str = "mean",
    scope: str = "tensor",
    weighting: str = "peft",
):
    return ties(*_deltas(inputs), density, weight, majority, disjoint, scope, weighting)


@merge_method("dare")
def _dare(inputs, weight, drop_rate: float = 0.3, rescale: bool = True, seed: int = 0):
    vectors, weights = _deltas(inputs)
    return dare(vectors, [weight * w for w in weights], drop_rate, rescale, seed)


@merge_method("dare_ties")
def _dare_ties(inputs, weight, drop_rate: float = 0.3, majority: str = "total", disjoint: str = "mean", seed: int = 0):
    return dare_ties(*_deltas(inputs), drop_rate, weight, majority, disjoint, seed)


@merge_method("resta", ("task", "safety"), "γ: the safety vector's coefficient")
def _resta(inputs, weight):
    return resta(inputs["task"].delta, inputs["safety"].delta, weight)


@merge_method("safe_lora", ("task", "safety"), "λ: scales the projected task update (1: as trained)")
def _safe_lora(inputs, weight, threshold: float | None = 0.5, num_layers: int | None = None):
    projected, _ = safe_lora(inputs["task"].delta, inputs["safety"].delta, threshold, num_layers)
    return task_arithmetic([projected], [weight])


def _check_safemerge(threshold: float, **_) -> None:
    if not -1 <= threshold <= 1:
        raise ValueError(f"threshold={threshold}: a cosine threshold must be in [-1, 1]")


@merge_method(
    "safemerge",
    ("task", "safety"),
    "λ: the safety adapter's share in the layers merged (SafeMERGE: 0.2)",
    (0.0, 1.0),
    check_args=_check_safemerge,
)
def _safemerge(inputs, weight, threshold: float = 0.35):
    merged, _ = safemerge(inputs["task"].delta, inputs["safety"].delta, weight, threshold)
    return merged


@merge_method("breadcrumbs", check_args=_check_breadcrumbs)
def _breadcrumbs(inputs, weight, density: float = 0.9, gamma: float = 0.01, rescale: bool = False):
    return breadcrumbs(*_deltas(inputs), density, gamma, weight, rescale)


@merge_method("della", check_args=_check_della)
def _della(
    inputs,
    weight,
    density: float = 0.7,
    epsilon: float = 0.15,
    rescale: bool = True,
    majority: str = "total",
    disjoint: str = "mean",
    seed: int = 0,
):
    return della(*_deltas(inputs), density, epsilon, weight, rescale, majority, disjoint, seed)


@merge_method(
    "model_stock",
    weight="λ: scales the merged vector (1: Model Stock; the inputs' own weights unused)",
    n_inputs=(2, None),
)
def _model_stock(inputs, weight, filter_wise: bool = False):
    return model_stock([i.delta for i in inputs.values()], weight, filter_wise)


@merge_method(
    "slerp",
    weight="t: 0 is the first input's ΔW, 1 the second's (their own weights unused)",
    weight_range=(0.0, 1.0),
    n_inputs=(2, 2),
)
def _slerp(inputs, weight):
    first, second = inputs.values()
    return slerp(first.delta, second.delta, weight)
