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
- `safe_lora` uses Safe LoRA's C = V·Vᵀ/‖V‖_F (V the aligned-minus-unaligned weights), as its paper and code do.
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
    return torch.stack([v[key].float() if key in v else torch.zeros_like(like, dtype=torch.float32)
                        for v in vectors])


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


def lora_linear(task: TaskVector, safety: TaskVector, scalings: tuple[float, float], weight: float,
                keep_task: bool = False) -> TaskVector:
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


def _magnitude_mask(stacked: torch.Tensor, density: float) -> torch.Tensor:
    """1 on the top `density` share of |entries| of each row (one task vector per row), 0 elsewhere."""
    flat = stacked.reshape(stacked.shape[0], -1)
    mask = torch.zeros_like(flat)
    k = int(density * flat.shape[1])
    for i in range(flat.shape[0]):
        mask[i, torch.topk(flat[i].abs(), k=k, largest=True).indices] = 1
    return mask.reshape(stacked.shape)


def _trimmed(vectors: Sequence[TaskVector], density: float, scope: str) -> dict[str, torch.Tensor]:
    """Stacked task vectors per key, each keeping its top `density` share by magnitude — per tensor, or across all
    of its tensors at once (`scope="global"`, SOMF's TIES)."""
    keys = _keys(vectors)
    stacks = {k: _stack(vectors, k) for k in keys}
    if density >= 1:
        return stacks
    if scope == "tensor":
        return {k: s * _magnitude_mask(s, density) for k, s in stacks.items()}
    if scope != "global":
        raise ValueError(f"scope must be 'tensor' or 'global', got {scope!r}")
    flat = torch.cat([s.reshape(s.shape[0], -1) for s in stacks.values()], dim=1)
    mask, start, out = _magnitude_mask(flat, density), 0, {}
    for k, s in stacks.items():
        size = s[0].numel()
        out[k] = s * mask[:, start:start + size].reshape(s.shape)
        start += size
    return out


def _elect_and_merge(stacked: torch.Tensor, weights: Sequence[float], majority: str, disjoint: str) -> torch.Tensor:
    """TIES' sign election (on the unweighted vectors) and disjoint mean or sum of the weighted agreeing entries."""
    if majority == "total":
        magnitude = stacked.sum(0)
    elif majority == "frequency":
        magnitude = stacked.sign().sum(0)
    else:
        raise ValueError(f"majority must be 'total' or 'frequency', got {majority!r}")
    agree = stacked.sign() == torch.where(magnitude >= 0, 1.0, -1.0)
    merged = (stacked * _weights(stacked, weights) * agree).sum(0)
    if disjoint == "sum":
        return merged
    if disjoint != "mean":
        raise ValueError(f"disjoint must be 'mean' or 'sum', got {disjoint!r}")
    return merged / agree.sum(0).clamp(min=1)


def ties(vectors: Sequence[TaskVector], weights: Sequence[float], density: float = 0.2, scale: float = 1.0,
         majority: Literal["total", "frequency"] = "total", disjoint: Literal["mean", "sum"] = "mean",
         scope: Literal["tensor", "global"] = "tensor") -> TaskVector:
    """TIES: trim each vector to its top `density` by magnitude, elect a sign per entry, merge the agreeing
    entries (mean or sum), times `scale` (SOMF: density 0.2, global scope, sum, scale 0.4)."""
    _check_rate("density", density, low_open=True)
    return {k: scale * _elect_and_merge(s, weights, majority, disjoint)
            for k, s in _trimmed(vectors, density, scope).items()}


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


def dare(vectors: Sequence[TaskVector], weights: Sequence[float], drop_rate: float = 0.3, rescale: bool = True,
         seed: int = 0) -> TaskVector:
    """DARE: drop each entry with probability `drop_rate`, rescale survivors by 1/(1−p), then Σ_i w_i·τ_i."""
    _check_rate("drop_rate", drop_rate, low_open=False)
    return {k: (s * _weights(s, weights)).sum(0)
            for k, s in _dropped(vectors, 1.0 - drop_rate, rescale, seed).items()}


def dare_ties(vectors: Sequence[TaskVector], weights: Sequence[float], drop_rate: float = 0.3, scale: float = 1.0,
              majority: Literal["total", "frequency"] = "total", disjoint: Literal["mean", "sum"] = "mean",
              seed: int = 0) -> TaskVector:
    """DARE's random drop and rescale, then TIES' sign election and disjoint merge, times `scale`."""
    _check_rate("drop_rate", drop_rate, low_open=False)
    return {k: scale * _elect_and_merge(s, weights, majority, disjoint)
            for k, s in _dropped(vectors, 1.0 - drop_rate, True, seed).items()}


def resta(task: TaskVector, safety: TaskVector, gamma: float) -> TaskVector:
    """Resta: the fine-tuned update plus γ times the safety vector (aligned − unaligned), in weight space."""
    return task_arithmetic([task, safety], [1.0, gamma])


def safe_lora(task: TaskVector, aligned: TaskVector, threshold: float | None = 0.5,
              num_layers: int | None = None) -> tuple[TaskVector, dict[str, float]]:
    """Safe LoRA: per weight, C = V·Vᵀ/‖V‖_F with V the aligned update; ΔW is replaced by C·ΔW on the layers whose
    cosine(C·ΔW, ΔW) ≤ `threshold`, or on the `num_layers` least similar ones. Returns (vector, the cosines)."""
    if (threshold is None) == (num_layers is None):
        raise ValueError("set exactly one of threshold or num_layers")
    projected, cosines = {}, {}
    for k, delta in task.items():
        if k not in aligned:
            raise ValueError(f"safe_lora: no aligned update for {k}")
        v = aligned[k].float()
        projected[k] = (v @ v.T / torch.linalg.norm(v)) @ delta.float()
        cosines[k] = torch.nn.functional.cosine_similarity(projected[k].reshape(1, -1),
                                                           delta.float().reshape(1, -1)).item()
    if threshold is not None:
        chosen = {k for k, c in cosines.items() if c <= threshold}
    else:
        chosen = set(sorted(cosines, key=cosines.get)[:num_layers])
    return {k: projected[k] if k in chosen else delta.float().clone() for k, delta in task.items()}, cosines


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
    needs (empty: any number, each with its own weight); `weight` says what `fusion.weight` means for it."""

    name: str
    fuse: Callable[..., TaskVector]
    roles: tuple[str, ...]
    weight: str
    weight_range: tuple[float, float] = (float("-inf"), float("inf"))
    args: dict = field(default_factory=dict)

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
        try:
            inspect.signature(self.fuse).bind(inputs, weight, **args)
        except TypeError as e:
            raise ValueError(f"merge {self.name!r}: {e}; its arguments are {sorted(self.args)}") from None


MERGES: dict[str, Merge] = {}


def merge_method(name: str, roles: tuple[str, ...] = (), weight: str = "λ: scales the merged vector",
                 weight_range: tuple[float, float] = (float("-inf"), float("inf"))):
    """Register `fn(inputs: dict[str, FusionInput], weight: float, **args) -> TaskVector` as `fusion.merge=name`."""
    def register(fn):
        params = inspect.signature(fn).parameters
        args = {k: p.default for k, p in list(params.items())[2:]}
        MERGES[name] = Merge(name, fn, roles, weight, weight_range, args)
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
def _ties(inputs, weight, density: float = 0.2, majority: str = "total", disjoint: str = "mean",
          scope: str = "tensor"):
    return ties(*_deltas(inputs), density, weight, majority, disjoint, scope)


@merge_method("dare")
def _dare(inputs, weight, drop_rate: float = 0.3, rescale: bool = True, seed: int = 0):
    vectors, weights = _deltas(inputs)
    return dare(vectors, [weight * w for w in weights], drop_rate, rescale, seed)


@merge_method("dare_ties")
def _dare_ties(inputs, weight, drop_rate: float = 0.3, majority: str = "total", disjoint: str = "mean",
               seed: int = 0):
    return dare_ties(*_deltas(inputs), drop_rate, weight, majority, disjoint, seed)


@merge_method("resta", ("task", "safety"), "γ: the safety vector's coefficient")
def _resta(inputs, weight):
    return resta(inputs["task"].delta, inputs["safety"].delta, weight)


@merge_method("safe_lora", ("task", "safety"), "λ: scales the projected task update (1: as trained)")
def _safe_lora(inputs, weight, threshold: float | None = 0.5, num_layers: int | None = None):
    projected, _ = safe_lora(inputs["task"].delta, inputs["safety"].delta, threshold, num_layers)
    return task_arithmetic([projected], [weight])
