"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) on unpaired rows (prompt, completion, desirable), over the
pair machinery of `pairs.py`.

Its data is unpaired preferences (`UnpairedPreference`: a file in TRL's unpaired layout, `dataset=unpaired`, or the
synthetic `unpaired` view), or preference pairs, unpaired as TRL's `unpair_preference_dataset` does: every chosen
completion a desirable row, every rejected one an undesirable row. Unequal numbers of desirable and undesirable rows
are handled as TRL's KTOTrainer does: the loss is the mean over rows of the weighted terms, and when
λ_D·n_D / (λ_U·n_U) lies outside [1, 4/3] (the paper's eq. 8) a warning recommends a range for either weight; the
weights are the user's to set (`method.desirable_weight`, `method.undesirable_weight`), never changed silently.

The reference point z₀ is TRL's estimate of KL(π ‖ π_ref): the detached mean log-ratio over mismatched (prompt,
completion) pairs, clamped at 0 (`losses.kto_reference_point`). Each row is one
"pair" of the pair module: its own completion and a mismatched one (the completion of the nearest earlier row with
another prompt), scored in one forward; the mismatched completion is fixed once for the dataset, so both halves'
reference log-probs are cached as DPO's are. TRL instead rotates completions by one inside each batch and therefore
needs sequential batches; here batches are shuffled as for every method, so a batch's mismatched completions are
other rows' completions, not the batch's own: the same estimator of the same KL, from a different sample. z₀ is
averaged over processes before the clamp, as TRL gathers it.
"""

from __future__ import annotations

import logging
import math

import torch

from safety_lab.data.collate import TokenizedPreferences
from safety_lab.data.records import Preference, UnpairedPreference
from safety_lab.errors import SafetyLabError
from safety_lab.methods import method, training_records
from safety_lab.methods.losses import kto_loss, kto_reference_point
from safety_lab.methods.packing import packed_if
from safety_lab.methods.pairs import Objective, PairMethod, fit_pairs, policy_and_reference

log = logging.getLogger(__name__)


def unpair(pairs: list[Preference]) -> list[UnpairedPreference]:
    """Every chosen completion a desirable row, then every rejected one an undesirable row (TRL's
    `unpair_preference_dataset`)."""
    return [UnpairedPreference(p.prompt, p.chosen, True) for p in pairs] + [
        UnpairedPreference(p.prompt, p.rejected, False) for p in pairs
    ]


def weight_advice(n_desirable: int, n_undesirable: int, desirable_weight: float, undesirable_weight: float) -> str:
    """TRL's KTOTrainer check of eq. 8 of Ethayarajh et al.: with unequal counts, λ_D·n_D / (λ_U·n_U) should lie in
    [1, 4/3] (TRL: 1.33). Outside it, the advice TRL logs: EITHER weight's range that brings the ratio back, the other
    kept; "" when the counts are equal (pairs always are) or the ratio is in range. A count of 0 counts as 1 (TRL)."""
    if n_desirable == n_undesirable:
        return ""
    n_d, n_u = max(n_desirable, 1), max(n_undesirable, 1)
    ratio = desirable_weight * n_d / (undesirable_weight * n_u) if undesirable_weight else math.inf
    if 1 <= ratio <= 4 / 3:
        return ""
    low_d, high_u = undesirable_weight * n_u / n_d, desirable_weight * n_d / n_u
    return (
        f"method=kto: {n_desirable} desirable and {n_undesirable} undesirable rows give λ_D·n_D / (λ_U·n_U) = "
        f"{ratio:.3g}, outside [1, 4/3] (Ethayarajh et al., eq. 8); set EITHER method.desirable_weight in "
        f"[{low_d:.3g}, {low_d * 4 / 3:.3g}] OR method.undesirable_weight in [{high_u * 3 / 4:.3g}, {high_u:.3g}]"
    )


def kl_partners(rows: list[UnpairedPreference]) -> list[int]:
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
        records = training_records(stages, base, cfg, dataset_cfg, UnpairedPreference, Preference)
        rows = unpair(records) if isinstance(records[0], Preference) else records
        desirable = sum(row.desirable for row in rows)
        if advice := weight_advice(desirable, len(rows) - desirable, cfg.desirable_weight, cfg.undesirable_weight):
            log.warning(advice)
        partners = kl_partners(rows)
        data = packed_if(
            stages.cfg,
            TokenizedPreferences(
                [Preference(row.prompt, row.completion, rows[j].completion) for row, j in zip(rows, partners)],
                base.tokenizer,
                stages.template,
                stages.cfg.model.max_length,
            ),
        )
        policy, reference = policy_and_reference(stages, base.model, cfg, data, needs_reference=True)
        objective = kto_objective(cfg, torch.tensor([row.desirable for row in rows]))
        return policy, fit_pairs(stages, self.name, policy, objective, reference, data, cfg)
