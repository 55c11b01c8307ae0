"""`method=lisa`: Lisa (Huang et al. 2024, "Lazy safety alignment"), bi-state optimisation with a proximal term.

The fit alternates `alignment_steps` optimiser steps on alignment data (`method.alignment`, a dataset config) with
`finetune_steps` steps on the user's data (the run's `dataset`), starting with alignment as Lisa's trainer does;
during an alignment step the user's batch is set aside and an alignment batch trained instead, so the total number
of steps is SFT's. Every step adds the proximal term ρ/2·‖w − w_anchor‖² over the trainable weights
(`losses.l2_penalty`), w_anchor being the weights at the last switch of state, except in the first `proximal_warmup`
share of the steps (Lisa's code: 10 %, "it will downgrade benign accuracy"). Alignment batches are global batches of
their own seeded permutation (data/batching.py), taken in order by a counter that a checkpoint keeps with the anchor,
so a resumed fit continues as the uninterrupted one.
"""

from __future__ import annotations

import torch

from safety_lab.data.batching import GlobalBatchSampler, MicroBatches, loss_units
from safety_lab.errors import SafetyLabError
from safety_lab.methods import method
from safety_lab.methods.losses import l2_penalty
from safety_lab.methods.packing import sequences
from safety_lab.methods.sft import SFT, SFTModule, optimiser_settings, sft_data


class LisaModule(SFTModule):
    STATE = "safety_lab/lisa"

    def __init__(
        self,
        model,
        alignment,
        micro_batch: int,
        accumulation: int,
        seed: int,
        rho: float,
        alignment_steps: int,
        finetune_steps: int,
        proximal_warmup: float,
        **optimiser,
    ):
        super().__init__(model, **optimiser)
        self.alignment = MicroBatches(alignment)
        self.batches = GlobalBatchSampler(loss_units(alignment), micro_batch, accumulation, seed)
        self.rho, self.alignment_steps, self.finetune_steps = rho, alignment_steps, finetune_steps
        self.proximal_warmup = proximal_warmup
        self.anchor, self.anchor_step, self.consumed, self.plan = None, -1, 0, None

    def trained(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def aligning(self, step: int) -> bool:
        return step % (self.alignment_steps + self.finetune_steps) < self.alignment_steps

    def next_alignment_batch(self) -> dict:
        """The alignment data's next micro-batch of this rank: epoch after epoch of its global batches."""
        if self.plan is None:
            self.plan = (0, self.batches.plan(0))
            if not self.plan[1]:
                raise SafetyLabError(
                    f"method.alignment: {len(self.alignment)} examples make no global batch of this fit; give more"
                )
        epoch, position = divmod(self.consumed, len(self.plan[1]))
        if epoch != self.plan[0]:
            self.plan = (epoch, self.batches.plan(epoch))
        self.consumed += 1
        return {k: v.to(self.device) for k, v in self.alignment[self.plan[1][position]].items()}

    def training_step(self, batch, batch_idx):
        step = self.global_step
        if self.anchor is None or step != self.anchor_step and self.aligning(step) != self.aligning(step - 1):
            self.anchor, self.anchor_step = [p.detach().clone() for p in self.trained()], step  # a switch
        aligning = self.aligning(step)
        if aligning:
            batch = self.next_alignment_batch()
        loss = super().training_step(batch, batch_idx)
        if step > self.proximal_warmup * self.trainer.estimated_stepping_batches:
            loss = loss + l2_penalty(self.trained(), self.rho, self.anchor)
        self.log("train/aligning", float(aligning), batch_size=sequences(batch))
        return loss

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint[self.STATE] = {"anchor": self.anchor, "anchor_step": self.anchor_step, "consumed": self.consumed}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint[self.STATE]
        self.anchor, self.anchor_step, self.consumed = state["anchor"], state["anchor_step"], state["consumed"]


@method("lisa")
class Lisa(SFT):
    def module(self, tuned, stages, base, method_cfg) -> SFTModule:
        m = method_cfg
        return LisaModule(
            tuned,
            sft_data(stages, base, m, m.alignment),
            m.batch_size,
            stages.cfg.trainer.accumulate_grad_batches,
            stages.cfg.seed,
            m.rho,
            m.alignment_steps,
            m.finetune_steps,
            m.proximal_warmup,
            **optimiser_settings(m),
        )
