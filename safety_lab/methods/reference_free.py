"""Preference objectives without a reference model, over the pair machinery of `pairs.py` (one forward over chosen
and rejected; no reference pass, nothing cached): `simpo` (Meng et al. 2024) and `orpo` (Hong et al. 2024), both on
per-token mean log-probs, each a pure loss of `losses.py` equal to TRL's on the same log-probs (tests)."""

from __future__ import annotations

from safety_lab.methods import method
from safety_lab.methods.losses import normalise_logps, orpo_loss, simpo_loss
from safety_lab.methods.pairs import Objective, PairMethod


def mean_logps(logps, counts):
    """(chosen, rejected) per-token mean log-probs of a [chosen; rejected] batch."""
    return normalise_logps(logps, counts, "mean").chunk(2)


@method("simpo")
class SimPO(PairMethod):
    """SimPO: the length-normalised log-prob is the reward, with a target margin γ = β·`gamma_beta_ratio`."""

    def objective(self, cfg) -> Objective:
        def objective(logps, counts, ref_logps, ref_counts, index):
            chosen, rejected = mean_logps(logps, counts)
            return simpo_loss(chosen, rejected, cfg.beta, cfg.gamma_beta_ratio), {
                "reward_accuracy": (chosen > rejected).float().mean(),
                "margin": cfg.beta * (chosen - rejected).mean().detach(),
            }

        return objective

    def needs_reference(self, cfg) -> bool:
        return False


@method("orpo")
class ORPO(PairMethod):
    """ORPO: the chosen response's NLL (per token over the batch, response tokens only as the ORPO code's
    `disable_prompt_loss`) plus λ = `odds_ratio_weight` times the odds-ratio loss."""

    def objective(self, cfg) -> Objective:
        def objective(logps, counts, ref_logps, ref_counts, index):
            chosen, rejected = mean_logps(logps, counts)
            summed_chosen, chosen_counts = logps.chunk(2)[0], counts.chunk(2)[0]
            chosen_nll = -summed_chosen.sum() / chosen_counts.sum().clamp(min=1)
            return orpo_loss(chosen, rejected, chosen_nll, cfg.odds_ratio_weight), {
                "chosen_nll": chosen_nll.detach(),
                "reward_accuracy": (chosen > rejected).float().mean(),
            }

        return objective

    def needs_reference(self, cfg) -> bool:
        return False
