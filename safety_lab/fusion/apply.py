"""Apply a fusion to a loaded model through fp32 deltas, as often as needed, without reloading it.

`FusedModel` keeps a pristine fp32 copy of every weight a fusion touches and writes W = W0 + ΔW on each call, so a
λ sweep costs one merge and one weight write per point, with no drift (repeated bf16 merge/unmerge compounds
error; restoring from W0 does not). `stage_input` turns a trained stage (a LoRA adapter on the model,
or a fully fine-tuned copy) into a `FusionInput` and hands the model back untouched. Which stages are fused, and at
which λ, is the fusion task's business (tasks/fuse.py).
"""

from __future__ import annotations

import torch
from peft import PeftModel

from safety_lab.fusion.merges import MERGES, FusionInput, TaskVector
from safety_lab.fusion.task_vectors import full_task_vector, lora_factors, lora_task_vector


def stage_input(tuned, base: torch.nn.Module, weight: float = 1.0) -> FusionInput:
    """The stage's task vector (dense ΔW, plus LoRA factors and α/r for adapters); a LoRA is unloaded from `base`."""
    if not isinstance(tuned, PeftModel):
        return FusionInput(full_task_vector(tuned, base), weight=weight)
    config = tuned.peft_config["default"]
    if config.use_rslora or config.rank_pattern or config.alpha_pattern:
        raise ValueError("fusion inputs need a plain LoRA (one rank and alpha, no rslora)")
    fused = FusionInput(lora_task_vector(tuned), lora_factors(tuned), config.lora_alpha / config.r, weight)
    tuned.unload()
    return fused


class FusedModel:
    """`model` with `merge(inputs, weight, **args)` written into its weights: `set(weight)` for each λ."""

    def __init__(self, model: torch.nn.Module, inputs: dict[str, FusionInput], merge: str, args: dict):
        self.model, self.inputs, self.merge, self.args = model, inputs, MERGES[merge], dict(args)
        params = dict(model.named_parameters())
        touched = list(dict.fromkeys(k for i in inputs.values() for k in i.delta))
        unknown = [k for k in touched if k not in params]
        if unknown:
            raise ValueError(f"the fusion inputs change weights the model does not have: {unknown[:3]}")
        self.params = {k: params[k] for k in touched}
        self.pristine = {k: p.detach().float().clone() for k, p in self.params.items()}

    def delta(self, weight: float) -> TaskVector:
        self.merge.check(list(self.inputs), weight, self.args)
        return self.merge.fuse(self.inputs, weight, **self.args)

    @torch.no_grad()
    def set(self, weight: float) -> torch.nn.Module:
        """The model with W = W0 + ΔW(weight) for every touched weight (others untouched)."""
        delta = self.delta(weight)
        for k, p in self.params.items():
            w = self.pristine[k] + delta[k].to(self.pristine[k].device) if k in delta else self.pristine[k]
            p.copy_(w.to(p.dtype))
        return self.model

    @torch.no_grad()
    def restore(self) -> torch.nn.Module:
        for k, p in self.params.items():
            p.copy_(self.pristine[k].to(p.dtype))
        return self.model
