"""Concrete (relaxed-Bernoulli) masks over task vectors, as in SOMF's mask-DPO realignment, and their exports.

A mask holds one logit ℓ per entry of each task-vector tensor; m ~ RelaxedBernoulli(T, ℓ) while training, so the
masked update m ⊙ τ / mean(m) (per-tensor mean rescaling, an inverted-dropout normalisation) is differentiable
w.r.t. ℓ. A trained mask is exported as σ(ℓ) (`expected`), 1[σ(ℓ) > 0.5] (`threshold`), one seeded Bernoulli
draw (`sample`) or the top-k fraction of each tensor (`topk`). One mask can be shared by several task vectors that
are merged inside the forward pass by a merge of `merges.py` (SOMF's multi-task realignment, methods/mask_dpo.py).
Logits are saved as safetensors.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

EXPORTS = ("expected", "threshold", "sample", "topk")
MASK_FILE = "mask_logits.safetensors"


def relaxed_bernoulli(logits: torch.Tensor, temperature: float, generator: torch.Generator | None = None):
    """m = σ((ℓ + log u − log(1 − u)) / T), u ~ U(0, 1): a reparameterised Concrete sample."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-6, 1 - 1e-6)
    return torch.sigmoid((logits + u.log() - (-u).log1p()) / temperature)


def rescaled(tau: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """m ⊙ τ / mean(m): the kept coordinates scaled up by the mask's density (zero if nothing is kept)."""
    density = mask.mean()
    return tau * mask / density if density > 0 else torch.zeros_like(tau)


def export_mask(logits: torch.Tensor, mode: str, seed: int = 0, top_k: float = 0.5) -> torch.Tensor:
    """A deterministic mask from trained logits (see the module docstring for the modes)."""
    if mode == "expected":
        return torch.sigmoid(logits)
    if mode == "threshold":
        return (logits > 0).float()  # σ(ℓ) > 0.5
    if mode == "sample":
        generator = torch.Generator(device=logits.device).manual_seed(seed)
        return torch.bernoulli(torch.sigmoid(logits), generator=generator)
    if mode == "topk":
        if not 0 < top_k <= 1:
            raise ValueError(f"top_k must be in (0, 1], got {top_k}")
        keep = max(1, round(top_k * logits.numel()))
        mask = torch.zeros(logits.numel(), device=logits.device)
        mask[logits.flatten().topk(keep).indices] = 1.0
        return mask.view_as(logits)
    raise ValueError(f"unknown mask export {mode!r}; choose from {EXPORTS}")


class ConcreteMask(torch.nn.Module):
    """Trainable logits, one tensor per named task-vector tensor (names may contain dots)."""

    def __init__(self, shapes: dict[str, torch.Size], init_logit: float = 0.0, temperature: float = 0.5):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"mask temperature must be > 0, got {temperature}")
        self.names = list(shapes)
        self.temperature = temperature
        self.logits = torch.nn.ParameterList(
            torch.nn.Parameter(torch.full(tuple(shapes[n]), float(init_logit))) for n in self.names
        )

    def named_logits(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.logits))

    def sample(self, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        return {n: relaxed_bernoulli(l, self.temperature, generator) for n, l in self.named_logits().items()}

    def export(self, mode: str, seed: int = 0, top_k: float = 0.5) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {n: export_mask(l, mode, seed + i, top_k) for i, (n, l) in enumerate(self.named_logits().items())}

    def density(self) -> dict[str, float]:
        """Expected share of each tensor's task vector that is kept, mean σ(ℓ)."""
        return {n: float(torch.sigmoid(l.detach()).mean()) for n, l in self.named_logits().items()}

    def save(self, folder: Path) -> None:
        save_file({n: l.detach().contiguous() for n, l in self.named_logits().items()}, str(Path(folder) / MASK_FILE))

    @classmethod
    def load(cls, folder: Path, temperature: float = 0.5) -> ConcreteMask:
        logits = load_file(str(Path(folder) / MASK_FILE))
        mask = cls({n: t.shape for n, t in logits.items()}, temperature=temperature)
        with torch.no_grad():
            for param, name in zip(mask.logits, mask.names):
                param.copy_(logits[name])
        return mask


def factor_deltas(factors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense ΔW = B·A of each weight from (masked) LoRA factors keyed `<weight>.lora_A` / `.lora_B` (the LoRA
    scaling folded into B)."""
    return {
        name.removesuffix(".lora_A"): factors[name.removesuffix(".lora_A") + ".lora_B"] @ a
        for name, a in factors.items()
        if name.endswith(".lora_A")
    }
