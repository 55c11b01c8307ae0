"""Task vectors over named tensors: what a LoRA adapter (or a full fine-tune) adds to the base weights.

Dense space (the default everywhere): one ΔW per adapted weight, keyed by the base model's parameter name, e.g.
`model.layers.0.self_attn.q_proj.weight`, computed in fp32 as peft does (scaling · B·A, fan-in/fan-out honoured).
Factor space (SOMF's choice): the adapter's own `lora_A` / `lora_B` tensors, for reproducing seed code exactly.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer


def base_weight_name(module_name: str) -> str:
    name = module_name.removeprefix("base_model.model.")
    return f"{name}.weight"


def lora_task_vector(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    """ΔW of every layer the adapter touches, in fp32, keyed by the base parameter name."""
    deltas = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            deltas[base_weight_name(name)] = module.get_delta_weight(adapter).detach().float().clone()
    return deltas


def lora_factors(model: PeftModel, adapter: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's LoRA factors, keyed `<base weight name>.lora_A` / `.lora_B` (factor space)."""
    factors = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            base = base_weight_name(name)
            factors[f"{base}.lora_A"] = module.lora_A[adapter].weight.detach().float().clone()
            factors[f"{base}.lora_B"] = module.lora_B[adapter].weight.detach().float().clone()
    return factors


def full_task_vector(tuned: torch.nn.Module, base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """θ_tuned − θ_base for every parameter that changed (full fine-tuning)."""
    base_params = dict(base.named_parameters())
    deltas = {}
    for name, p in tuned.named_parameters():
        delta = p.detach().float() - base_params[name].detach().float()
        if delta.abs().max() > 0:
            deltas[name] = delta
    return deltas
