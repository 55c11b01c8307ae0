"""Mask-DPO realignment (SOMF): DPO on safety preferences trains a Concrete mask over task vectors, nothing else.

The task adapters come from stage recipes (`method.tasks.<name>: {method, dataset}`) applied to the base the method
is given (the aligned model) through `Stages.apply`, so each is trained once and shared with any run that names the
same recipe. Their task vectors τ_i (dense ΔW per adapted weight, or the LoRA factors with `mask.space=factors`) stay
fixed; the policy is θ_safe plus the registered merge `merge` (fusion.merges.MERGES) of the masked τ_i at weight λ:
λ·Σ_i m ⊙ τ_i / mean(m) for `task_arithmetic`, TIES over the masked τ_i for `ties`. It is evaluated with
`torch.func.functional_call`, so it is differentiable w.r.t. the mask logits, with a fresh Concrete sample m per
forward. The reference is deterministic: the unmasked fine-tuned
model θ_safe + λ·Σ_i τ_i (SOMF's code re-samples a random mask for it). The trained logits are a `mask` artifact
(exports do not retrain it); the run's own artifact is the realigned model for the chosen `export`.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

import torch
from torch.func import functional_call

from safety_lab.config import plain
from safety_lab.errors import SafetyLabError
from safety_lab.fusion.mask import ConcreteMask, factor_deltas, rescaled
from safety_lab.fusion.merges import MERGES, FusionInput
from safety_lab.fusion.task_vectors import lora_factors, lora_task_vector
from safety_lab.methods import Method, method
from safety_lab.methods.dpo import dpo_objective
from safety_lab.methods.packing import batch_logps, refuse_packing
from safety_lab.methods.pairs import disable_dropout, fit_pairs, preference_data, reference_logps, weights_hash

log = logging.getLogger(__name__)
EXPORT_KEYS = ("export", "export_seed", "top_k")  # how a trained mask is used, not how it is trained


class MaskedPolicy(torch.nn.Module):
    """A frozen model whose adapted weights are W0 + merge({m ⊙ τ_i / mean(m)}, λ) (task arithmetic: λ·Σ_i …); the
    mask's logits are the only trainable parameters. `masks` fixes m (e.g. all ones: the reference); otherwise each
    forward samples it."""

    def __init__(
        self,
        model: torch.nn.Module,
        taus: list[dict[str, torch.Tensor]],
        weight: float = 1.0,
        factors: bool = False,
        mask: ConcreteMask | None = None,
        merge: str = "task_arithmetic",
        merge_args: dict | None = None,
    ):
        super().__init__()
        self.model, self.weight, self.factors, self.mask = model.requires_grad_(False), weight, factors, mask
        self.merging, self.merge_args = MERGES[merge], dict(merge_args or {})
        self.masks: dict[str, torch.Tensor] | None = None
        self.names = list(taus[0])
        for i, tau in enumerate(taus):  # buffers, so they follow the module to its device, but stay out of checkpoints
            for j, name in enumerate(self.names):
                self.register_buffer(f"tau_{i}_{j}", tau[name], persistent=False)
        self.n_tasks = len(taus)

    @property
    def taus(self) -> list[dict[str, torch.Tensor]]:
        return [{name: getattr(self, f"tau_{i}_{j}") for j, name in enumerate(self.names)} for i in range(self.n_tasks)]

    def deltas(self, masks: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Dense ΔW per adapted weight, keyed by the model's parameter name."""
        masked = {
            str(i): FusionInput({name: rescaled(tau[name], mask) for name, mask in masks.items()})
            for i, tau in enumerate(self.taus)
        }
        merged = self.merging.fuse(masked, self.weight, **self.merge_args)
        return factor_deltas(merged) if self.factors else merged

    def ones(self) -> dict[str, torch.Tensor]:
        return {name: torch.ones_like(t) for name, t in self.taus[0].items()}

    def forward(self, input_ids, attention_mask):
        masks = self.masks if self.masks is not None else self.mask.sample()
        params = dict(self.model.named_parameters())
        weights = {name: params[name] + delta.to(params[name]) for name, delta in self.deltas(masks).items()}
        return functional_call(
            self.model, weights, args=(), kwargs={"input_ids": input_ids, "attention_mask": attention_mask}
        )

    @torch.no_grad()
    def merge(self, masks: dict[str, torch.Tensor]) -> torch.nn.Module:
        """The plain model with the masked update added into its weights (in place)."""
        params = dict(self.model.named_parameters())
        for name, delta in self.deltas(masks).items():
            params[name] += delta.to(params[name])
        return self.model


def task_vectors(stages, base, cfg) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """(τ_i of each `method.tasks` stage trained on `base`, their artifact ids); `base.model` is left as it was."""
    taus, ids = [], []
    for stage in cfg.tasks.values():
        tuned = stages.apply(base, stage.method, stage.dataset)
        if cfg.mask.space == "factors":  # fold the LoRA scaling into B, so ΔW = B·A
            tau = lora_factors(tuned.model)
            scaling = stage.method.lora.alpha / stage.method.lora.r
            tau = {k: v * scaling if k.endswith(".lora_B") else v for k, v in tau.items()}
        else:
            tau = lora_task_vector(tuned.model)
        tuned.model.unload()
        taus.append(tau)
        ids.append(tuned.id)
    if any(t.keys() != taus[0].keys() for t in taus):
        raise SafetyLabError("method.tasks adapt different weights; a shared mask needs the same target_modules")
    return taus, ids


def density_per_layer(density: dict[str, float], shapes: dict[str, torch.Size]) -> dict[str, float]:
    """Mean kept share per transformer layer (`layers.<i>.`), weighted by tensor size."""
    kept, total = defaultdict(float), defaultdict(int)
    for name, share in density.items():
        layer = re.search(r"layers\.(\d+)\.", name)
        key = f"mask/density_layer{layer.group(1)}" if layer else "mask/density_other"
        kept[key] += share * shapes[name].numel()
        total[key] += shapes[name].numel()
    return {k: kept[k] / total[k] for k in sorted(kept)}


@method("mask_dpo")
class MaskDPO(Method):
    def check(self, cfg) -> None:
        dpo_objective(cfg)
        if not cfg.tasks:
            raise SafetyLabError("method.tasks is empty: mask-DPO needs at least one task stage {method, dataset}")
        for name, stage in cfg.tasks.items():
            if not stage.get("method") or not stage.method.get("lora") or not stage.get("dataset"):
                raise SafetyLabError(
                    f"method.tasks.{name} must be a stage with a LoRA method and a dataset "
                    "(mask-DPO masks a LoRA task vector)"
                )
        try:
            MERGES[cfg.merge].check(list(cfg.tasks), cfg.task_weight, plain(cfg.merge_args))
        except ValueError as e:
            raise SafetyLabError(f"method.merge / method.merge_args: {e}") from None

    def kind(self, method_cfg) -> str:
        return "model"  # the realigned model for one export; the mask itself is its own `mask` artifact

    def train(self, stages, base, cfg, dataset_cfg):
        refuse_packing(stages.cfg, self.name)
        objective = dpo_objective(cfg)
        taus, task_ids = task_vectors(stages, base, cfg)
        model = base.model
        disable_dropout(model)
        policy = MaskedPolicy(
            model,
            taus,
            cfg.task_weight,
            factors=cfg.mask.space == "factors",
            merge=cfg.merge,
            merge_args=plain(cfg.merge_args),
        )
        if cfg.export == "none":
            return policy.merge(policy.ones()), {}
        shapes = {name: t.shape for name, t in taus[0].items()}

        def build(folder):
            data = preference_data(stages, base, cfg, dataset_cfg)
            policy.masks = policy.ones()
            model.eval()
            reference_id = "-".join(
                map(
                    str,
                    (
                        weights_hash(dict(model.named_parameters()), *taus),
                        cfg.task_weight,
                        cfg.mask.space,
                        cfg.merge,
                        sorted(plain(cfg.merge_args).items()),
                    ),
                )
            )
            reference = reference_logps(
                stages, lambda batch: batch_logps(policy, batch), data, reference_id, cfg.ref_batch_size
            )
            policy.masks = None
            policy.mask = ConcreteMask(shapes, cfg.mask.init_logit, cfg.mask.temperature)

            def regularised(*args):
                loss, logs = objective(*args)
                logits = list(policy.mask.logits)
                density = sum(torch.sigmoid(l).sum() for l in logits) / sum(l.numel() for l in logits)
                return loss + cfg.mask.sparsity * density, {**logs, "mask_density": density.detach()}

            metrics = fit_pairs(stages, self.name, policy, regularised, reference, data, cfg)
            policy.mask.save(folder)
            return {**metrics, **density_per_layer(policy.mask.density(), shapes)}

        method = {k: v for k, v in plain(cfg).items() if k not in EXPORT_KEYS}
        folder = stages.get_or_build("mask", build, base=base.id, tasks=task_ids, dataset=dataset_cfg, method=method)
        mask = ConcreteMask.load(folder, cfg.mask.temperature)
        exported = mask.export(cfg.export, cfg.export_seed, cfg.top_k)
        kept = density_per_layer({n: float(m.mean()) for n, m in exported.items()}, shapes)
        log.info(
            "mask %s (export=%s): kept share per layer %s",
            folder.name,
            plain(cfg)["export"],
            {k: round(v, 3) for k, v in kept.items()},
        )
        return policy.merge(exported), {**kept, "mask": f"mask/{folder.name}"}
