"""Direct preference optimisation: its objective over the pair machinery of `pairs.py` (one forward over chosen and
rejected, cached reference log-probs), with optionally asymmetric betas (Jain et al.)."""

from __future__ import annotations

from safety_lab.errors import SafetyLabError
from safety_lab.methods import method
from safety_lab.methods.losses import dpo_loss, normalise_logps
from safety_lab.methods.pairs import Objective, PairMethod, check_logp_settings


def dpo_objective(cfg) -> Objective:
    if cfg.beta <= 0 or (cfg.beta_rejected is not None and cfg.beta_rejected <= 0):
        raise SafetyLabError(f"method.beta / method.beta_rejected must be > 0, got {cfg.beta} / {cfg.beta_rejected}")
    check_logp_settings(cfg)

    def objective(logps, counts, ref_logps, ref_counts):
        policy = normalise_logps(logps, counts, cfg.logp, cfg.fixed_length).chunk(2)
        ref = normalise_logps(ref_logps, ref_counts, cfg.logp, cfg.fixed_length).chunk(2)
        loss = dpo_loss(policy[0], policy[1], ref[0], ref[1], cfg.beta, cfg.beta_rejected)
        chosen_reward, rejected_reward = policy[0] - ref[0], policy[1] - ref[1]
        return loss, {
            "reward_accuracy": (chosen_reward > rejected_reward).float().mean(),
            "margin": (chosen_reward - rejected_reward).mean(),
        }

    return objective


@method("dpo")
class DPO(PairMethod):
    objective = staticmethod(dpo_objective)
