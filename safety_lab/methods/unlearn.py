"""Unlearning on preference pairs: gradient ascent, gradient difference (Jain et al.) and NPO (`method=unlearn`),
and SimNPO (`method=simnpo`, Fan et al. 2024).

The preferred response is kept (descent on its NLL, weight `retain_weight`); the dispreferred one is forgotten
(weight `forget_weight`) by ascent on its NLL (`ascent`, `graddiff`; optionally clamped so it cannot diverge), by
NPO against cached reference log-probs (`npo`), or by SimNPO, NPO without a reference on the per-token mean log-prob.
Batching, the LoRA policy and the reference cache are the pair machinery's (`pairs.py`). RMU, which unlearns on
activations rather than log-probs, is rmu.py.
"""

from __future__ import annotations

from safety_lab.errors import SafetyLabError
from safety_lab.methods import method
from safety_lab.methods.losses import ascent_term, normalise_logps, npo_term, simnpo_term, unlearning_loss
from safety_lab.methods.pairs import PairMethod, check_logp_settings


def unlearn_objective(cfg):
    loss = cfg.loss
    check_logp_settings(cfg)
    if loss == "npo" and cfg.clamp is not None:
        raise SafetyLabError("method.clamp bounds gradient ascent; NPO is bounded already (leave clamp unset)")

    def objective(logps, counts, ref_logps, ref_counts, index):
        keep, forget = normalise_logps(logps, counts, cfg.logp, cfg.fixed_length).chunk(2)
        if loss == "npo":
            ref_forget = normalise_logps(ref_logps, ref_counts, cfg.logp, cfg.fixed_length).chunk(2)[1]
            forget_term = npo_term(forget, ref_forget, cfg.beta)
        else:
            forget_term = ascent_term(-forget, cfg.clamp)
        return unlearning_loss(-keep, forget_term, cfg.retain_weight, cfg.forget_weight), {
            "forget_nll": -forget.mean().detach(),
            "retain_nll": -keep.mean().detach(),
        }

    return objective


@method("unlearn")
class Unlearn(PairMethod):
    objective = staticmethod(unlearn_objective)

    def needs_reference(self, cfg) -> bool:
        return cfg.loss == "npo"  # only NPO compares with the reference


def simnpo_objective(cfg):
    def objective(logps, counts, ref_logps, ref_counts, index):
        keep, forget = normalise_logps(logps, counts, "mean").chunk(2)
        return unlearning_loss(-keep, simnpo_term(forget, cfg.beta, cfg.gamma), cfg.retain_weight, cfg.forget_weight), {
            "forget_nll": -forget.mean().detach(),
            "retain_nll": -keep.mean().detach(),
        }

    return objective


@method("simnpo")
class SimNPO(PairMethod):
    """SimNPO on the dispreferred response, per-token NLL descent on the preferred; no reference."""

    objective = staticmethod(simnpo_objective)

    def needs_reference(self, cfg) -> bool:
        return False
