"""`method=sft_l2`: supervised fine-tuning pulled towards the aligned weights it starts from.

The loss is SFT's plus λ/2·‖W − W_aligned‖² (`losses.l2_penalty`, λ = `l2_weight`), the fine-tuning-stage
regulariser of the harmful fine-tuning benchmarks. With a LoRA adapter W − W_aligned is each adapted layer's
ΔW = s·B·A (peft's `get_delta_weight`), so the penalty is the distance actually travelled in weight space; a penalty
on the factors A and B would instead be weight decay of an arbitrary factorisation (A starts random, so ‖A‖² is not
zero at the aligned weights, and rescaling A by c and B by 1/c changes it without changing W). With full fine-tuning
(`method.lora=null`) it is Σ‖θ − θ_aligned‖² over the trained parameters, against a copy taken before the fit.
"""

from __future__ import annotations

from peft import PeftModel
from peft.tuners.lora import LoraLayer

from safety_lab.methods import method
from safety_lab.methods.losses import l2_penalty
from safety_lab.methods.packing import sequences
from safety_lab.methods.sft import SFT, SFTModule, optimiser_settings


class SFTL2Module(SFTModule):
    def __init__(self, model, l2_weight: float, **optimiser):
        super().__init__(model, **optimiser)
        self.l2_weight = l2_weight
        self.lora = isinstance(model, PeftModel)
        trained = [] if self.lora else [p for p in model.parameters() if p.requires_grad]
        self.aligned = [p.detach().clone() for p in trained]

    def distance(self):
        """(tensors, anchors) whose squared distance is ‖W − W_aligned‖²: the adapters' ΔW, or θ and a copy."""
        if self.lora:
            deltas = [m.get_delta_weight("default") for m in self.model.modules() if isinstance(m, LoraLayer)]
            return deltas, None
        return [p for p in self.model.parameters() if p.requires_grad], self.aligned

    def training_step(self, batch, batch_idx):
        tensors, anchors = self.distance()
        penalty = l2_penalty(tensors, self.l2_weight, anchors)
        self.log("train/l2_penalty", penalty.detach(), batch_size=sequences(batch))
        # added to every micro-batch: Lightning's division by the accumulation and the ranks' average leave it once
        return super().training_step(batch, batch_idx) + penalty


@method("sft_l2")
class SFTL2(SFT):
    def module(self, tuned, stages, base, method_cfg) -> SFTModule:
        return SFTL2Module(tuned, method_cfg.l2_weight, **optimiser_settings(method_cfg))
