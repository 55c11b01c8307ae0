"""Direct preference optimisation and its reference-based variants, as objectives over the pair machinery of
`pairs.py` (one forward over chosen and rejected, cached reference log-probs): `dpo` (sigmoid, optionally asymmetric
betas: Jain et al.), `ipo` (Azar et al.), `cdpo` (conservative DPO: label smoothing, Mitchell) and `robust_dpo`
(Chowdhury et al.), each a pure loss of `losses.py` equal to TRL's on the same log-probs (tests)."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from safety_lab.errors import SafetyLabError
from safety_lab.methods import method
from safety_lab.methods.losses import conservative_dpo_loss, dpo_loss, ipo_loss, normalise_logps, robust_dpo_loss
from safety_lab.methods.pairs import Objective, PairMethod, check_logp_settings


def dpo_objective(cfg, loss: Callable | None = None) -> Objective:
    """`loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected)` over the log-probs normalised as `cfg.logp`
    says; sigmoid DPO with `cfg`'s betas unless given."""
    check_logp_settings(cfg)
    loss = loss or partial(dpo_loss, beta=cfg.beta, beta_rejected=cfg.beta_rejected)

    def objective(logps, counts, ref_logps, ref_counts, index):
        policy = normalise_logps(logps, counts, cfg.logp, cfg.fixed_length).chunk(2)
        ref = normalise_logps(ref_logps, ref_counts, cfg.logp, cfg.fixed_length).chunk(2)
        chosen_reward, rejected_reward = policy[0] - ref[0], policy[1] - ref[1]
        return loss(policy[0], policy[1], ref[0], ref[1]), {
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
        }

    return objective


@method("dpo")
class DPO(PairMethod):
    objective = staticmethod(dpo_objective)


@method("ipo")
class IPO(PairMethod):
    """IPO: the squared distance of the log-ratio margin to 1/(2τ), τ = `beta`."""

    def objective(self, cfg) -> Objective:
        if cfg.beta_rejected is not None:
            raise SafetyLabError("method.beta_rejected: IPO has one regulariser τ (method.beta); leave it null")
        return dpo_objective(cfg, partial(ipo_loss, beta=cfg.beta))


@method("cdpo")
class ConservativeDPO(PairMethod):
    """Conservative DPO: sigmoid DPO with each label flipped with probability `label_smoothing`."""

    def objective(self, cfg) -> Objective:
        loss = partial(
            conservative_dpo_loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing, beta_rejected=cfg.beta_rejected
        )
        return dpo_objective(cfg, loss)


@method("robust_dpo")
class RobustDPO(PairMethod):
    """Robust DPO: the unbiased estimate of the clean DPO loss under labels flipped with probability
    `label_smoothing`."""

    def objective(self, cfg) -> Objective:
        loss = partial(
            robust_dpo_loss, beta=cfg.beta, label_smoothing=cfg.label_smoothing, beta_rejected=cfg.beta_rejected
        )
        return dpo_objective(cfg, loss)
