"""What every method trained on preference pairs shares: one forward over chosen and rejected, and the reference.

`PairModule` scores chosen and rejected responses in one forward pass ([chosen; rejected] along the batch) and
hands their log-probs, with the reference's, to an objective built from the pure losses in `losses.py` (DPO, IPO,
cDPO, robust DPO, SimPO, ORPO, KTO, unlearning's, mask-DPO's). KTO's rows are unpaired: its "pair" is a row's
completion and a mismatched one for the KL reference point (kto.py). The reference log-probs are computed once,
before training, from the model as it is given (for a LoRA policy: the same weights with the adapter disabled, so
there is one copy of the weights; for full fine-tuning: the weights before the first step, so no frozen copy is kept)
and cached in the artifact store under `ref_logps`, keyed by the data fingerprint and a hash of the reference
weights: reruns and sweeps never recompute them. Dropout is off.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from safety_lab.config import plain
from safety_lab.data.collate import TokenizedPreferences
from safety_lab.data.records import Preference
from safety_lab.errors import SafetyLabError
from safety_lab.methods import Method, training_records
from safety_lab.methods.losses import sequence_logps
from safety_lab.methods.sft import SFTModule
from safety_lab.models.factory import eval_mode
from safety_lab.models.lora import trainable

if TYPE_CHECKING:
    from safety_lab.stages import Stages

REF_FILE = "ref_logps.safetensors"

# objective(policy log-probs [2B], policy token counts [2B], reference log-probs [2B] or None, their counts, the
# batch's row indices [B]) -> (loss, logs); the indices look up per-row data of the objective's own (KTO's labels)
Objective = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]


def weights_hash(*named_tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and bytes of every tensor: the identity of a reference model's weights."""
    digest = hashlib.sha256()
    for tensors in named_tensors:
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def preference_data(stages: Stages, method_cfg, dataset_cfg, tokenizer) -> TokenizedPreferences:
    pairs = training_records(stages, method_cfg, dataset_cfg, Preference)
    return TokenizedPreferences(pairs, tokenizer, stages.template, stages.cfg.model.max_length)


def check_logp_settings(cfg) -> None:
    if cfg.logp == "fixed" and not cfg.fixed_length:
        raise SafetyLabError("method.logp=fixed needs method.fixed_length (Jain et al.: 159)")
    if cfg.logp != "fixed" and cfg.fixed_length:
        raise SafetyLabError(
            f"method.fixed_length is only used with method.logp=fixed, not {getattr(cfg.logp, 'value', cfg.logp)}"
        )


@torch.no_grad()
def reference_logps(
    stages: Stages, forward: Callable, data: TokenizedPreferences, weights_id: str, batch_size: int
) -> dict[str, torch.Tensor]:
    """{"logps": [N, 2] summed log-probs of (chosen, rejected), "counts": [N, 2] their token counts} under the
    reference `forward(input_ids, attention_mask) -> logits`, from the store when it has them."""

    def build(folder):  # pairs in order of length, so batches carry little padding; results go back by index
        by_length = sorted(range(len(data)), key=data.length)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, sampler=by_length, collate_fn=data.collate)
        logps, counts = torch.zeros(len(data), 2), torch.zeros(len(data), 2, dtype=torch.long)
        for batch in loader:
            summed, n = sequence_logps(forward(batch["input_ids"], batch["attention_mask"]), batch["labels"])
            logps[batch["index"]] = summed.view(2, -1).T.cpu()
            counts[batch["index"]] = n.view(2, -1).T.cpu()
        save_file({"logps": logps, "counts": counts}, str(folder / REF_FILE))
        return {"pairs": len(data)}

    folder = stages.get_or_build("ref_logps", build, data=data.fingerprint, reference=weights_id)
    return load_file(str(folder / REF_FILE))


class PairModule(L.LightningModule):
    """Trains `model` (anything whose forward gives `.logits`) on preference batches with `objective`."""

    configure_optimizers = SFTModule.configure_optimizers  # same AdamW + warm-up/cosine, same hparam names

    def __init__(
        self,
        model: torch.nn.Module,
        objective: Objective,
        reference: dict | None,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        self.model, self.objective, self.reference = model, objective, reference
        self.save_hyperparameters(ignore=["model", "objective", "reference"])

    def training_step(self, batch, batch_idx):
        logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logps, counts = sequence_logps(logits, batch["labels"])
        ref = None
        if self.reference is not None:  # [B, 2] rows of the batch's pairs -> [2B] as (chosen; rejected)
            ref = [self.reference[k][batch["index"].cpu()].T.flatten().to(logps.device) for k in ("logps", "counts")]
        loss, logs = self.objective(logps, counts, *(ref or (None, None)), batch["index"])
        size = batch["index"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=size)
        # every objective is a mean over pairs: as a sum over them divided by the global batch's normaliser it
        # averages the whole global batch however it is split (data/batching.py)
        return loss * size / batch.get("loss_normalizer", size)


def fit_pairs(stages: Stages, stage: str, policy, objective: Objective, reference, data, m) -> dict:
    module = PairModule(
        policy,
        objective,
        reference,
        lr=m.lr,
        weight_decay=m.weight_decay,
        warmup_ratio=m.warmup_ratio,
        min_lr_ratio=m.min_lr_ratio,
    )
    return stages.fit(stage, module, data, m.batch_size, m.epochs, stages.cfg.seed)


def policy_and_reference(stages: Stages, model, m, data, needs_reference: bool):
    """(policy: the model with a fresh LoRA adapter, or the model itself; cached reference log-probs or None)."""
    reference_id = weights_hash(dict(model.named_parameters())) if needs_reference else None
    policy = trainable(model, plain(m.lora))
    disable_dropout(policy)
    if not needs_reference:
        return policy, None
    adapter_off = policy.disable_adapter if m.lora else contextlib.nullcontext

    def forward(input_ids, attention_mask):
        with adapter_off():
            return policy(input_ids=input_ids, attention_mask=attention_mask).logits

    with eval_mode(policy):
        reference = reference_logps(stages, forward, data, reference_id, m.ref_batch_size)
    return policy, reference


class PairMethod(Method):
    """A method trained on preference pairs through `objective(cfg)`; `needs_reference(cfg)` says whether the
    objective reads reference log-probs (then computed once and cached)."""

    def objective(self, cfg) -> Objective:
        raise NotImplementedError

    def needs_reference(self, cfg) -> bool:
        return True

    def check(self, method_cfg) -> None:
        self.objective(method_cfg)

    def train(self, stages, base, method_cfg, dataset_cfg):
        objective = self.objective(method_cfg)
        data = preference_data(stages, method_cfg, dataset_cfg, base.tokenizer)
        policy, reference = policy_and_reference(stages, base.model, method_cfg, data, self.needs_reference(method_cfg))
        return policy, fit_pairs(stages, self.name, policy, objective, reference, data, method_cfg)
