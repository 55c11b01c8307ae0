"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired rows (prompt, completion, desirable), over the
pair machinery of `pairs.py`.

Preference pairs are unpaired as TRL's `unpair_preference_dataset` does: every chosen completion is a desirable row,
every rejected one an undesirable row. The reference point z₀ is TRL's estimate of KL(π ‖ π_ref): the detached mean
log-ratio over mismatched (prompt, completion) pairs, clamped at 0 (`losses.kto_reference_point`). Each row is one
"pair" of the pair module: its own completion and a mismatched one (the completion of the nearest earlier row with
another prompt), scored in one forward; the mismatched completion is fixed once for the dataset, so both halves'
reference log-probs are cached as DPO's are. TRL instead rotates completions by one inside each batch and therefore
needs sequential batches; here batches are shuffled as for every method, so a batch's mismatched completions are
other rows' completions, not the batch's own: the same estimator of the same KL, from a different sample. z₀ is
averaged over processes before the clamp, as TRL gathers it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from safety_lab.data.collate import TokenizedPreferences
from safety_lab.data.records import Preference
from safety_lab.errors import SafetyLabError
from safety_lab.methods import method
from safety_lab.methods.losses import kto_loss, kto_reference_point
from safety_lab.methods.pairs import Objective, PairMethod, fit_pairs, policy_and_reference, preference_pairs


@dataclass(frozen=True)
class Unpaired:
    prompt: str
    completion: str
    desirable: bool


def unpair(pairs: list[Preference]) -> list[Unpaired]:
    """Every chosen completion a desirable row, then every rejected one an undesirable row (TRL's
    `unpair_preference_dataset`)."""
    return [Unpaired(p.prompt, p.chosen, True) for p in pairs] + [Unpaired(p.prompt, p.rejected, False) for p in pairs]


def kl_partners(rows: list[Unpaired]) -> list[int]:
    """For each row, the nearest earlier row (cyclically) with another prompt: its completion, after this row's prompt,
    is the mismatched pair of the KL estimate (TRL: the previous row's, inside each batch)."""
    partners = []
    for i, row in enumerate(rows):
        j = next((j % len(rows) for j in range(i - 1, i - len(rows), -1) if rows[j].prompt != row.prompt), None)
        if j is None:
            raise SafetyLabError("method=kto needs at least two different prompts to estimate its KL reference point")
        partners.append(j)
    return partners


def process_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over the processes of a distributed run (itself in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        value = value.clone()
        torch.distributed.all_reduce(value)
        value = value / torch.distributed.get_world_size()
    return value


def kto_objective(cfg, desirable: torch.Tensor) -> Objective:
    """KTO over "pairs" (row's completion; mismatched completion), `desirable[i]` the label of row i."""

    def objective(logps, counts, ref_logps, ref_counts, index):
        matched, mismatched = logps.chunk(2)
        ref_matched, ref_mismatched = ref_logps.chunk(2)
        z0 = kto_reference_point(mismatched, ref_mismatched, average=process_mean)
        labels = desirable[index.cpu()].to(logps.device)
        loss = kto_loss(matched, ref_matched, labels, z0, cfg.beta, cfg.desirable_weight, cfg.undesirable_weight)
        signed = torch.where(labels, 1.0, -1.0) * (matched - ref_matched - z0)
        return loss, {"kl": z0, "reward_accuracy": (signed > 0).float().mean()}

    return objective


@method("kto")
class KTO(PairMethod):
    def check(self, cfg) -> None:
        if cfg.desirable_weight == 0 and cfg.undesirable_weight == 0:
            raise SafetyLabError("method.desirable_weight and method.undesirable_weight are both 0: nothing to learn")

    def train(self, stages, base, cfg, dataset_cfg):
        rows = unpair(preference_pairs(stages, cfg, dataset_cfg))
        partners = kl_partners(rows)
        data = TokenizedPreferences(
            [Preference(row.prompt, row.completion, rows[j].completion) for row, j in zip(rows, partners)],
            base.tokenizer,
            stages.template,
            stages.cfg.model.max_length,
        )
        policy, reference = policy_and_reference(stages, base.model, cfg, data, needs_reference=True)
        objective = kto_objective(cfg, torch.tensor([row.desirable for row in rows]))
        return policy, fit_pairs(stages, self.name, policy, objective, reference, data, cfg)
