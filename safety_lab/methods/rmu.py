"""Representation misdirection for unlearning (RMU; Li et al. 2024, WMDP §5) on preference pairs.

At the output of decoder layer `layer`, the activations of the dispreferred response's tokens (the forget set) are
pushed towards c·u, u a random unit vector fixed by the run's seed (uniform entries, normalised, as the WMDP code
draws it; c = `steering_coeff`), and those of the preferred response's tokens (the retain set) are held at the frozen
model's, weighted by α = `retain_weight` (`losses.rmu_loss`). Only response tokens count: the two rows of a pair share
their prompt, whose activations could not be both moved and kept.

The frozen model is, for a LoRA policy, the same weights with the adapter disabled (as the pair module's reference:
one copy of the weights); for full fine-tuning, a frozen copy made before training. WMDP updates the MLPs of layers
ℓ−2..ℓ only; here what trains is the LoRA adapter's `target_modules` (layers above `layer` get no gradient).
"""

from __future__ import annotations

import contextlib
import copy

import lightning as L
import torch

from safety_lab.config import plain
from safety_lab.data.collate import IGNORE
from safety_lab.errors import SafetyLabError
from safety_lab.methods import Method, method
from safety_lab.methods.losses import masked_mse, rmu_control_vector, rmu_loss
from safety_lab.methods.packing import refuse_packing
from safety_lab.methods.pairs import disable_dropout, preference_data
from safety_lab.methods.sft import SFTModule
from safety_lab.models.lora import trainable
from safety_lab.models.sharding import no_split_layers


def decoder_layer(model: torch.nn.Module, index: int) -> torch.nn.Module:
    """The `index`-th decoder layer of a Hugging Face causal LM (or a PeftModel around one)."""
    layers = no_split_layers(model)
    if not layers:
        raise SafetyLabError(f"method=rmu needs a Hugging Face decoder (its _no_split_modules); got {type(model)}")
    if not 0 <= index < len(layers):
        raise SafetyLabError(f"method.layer={index}: the model has decoder layers 0..{len(layers) - 1}")
    return layers[index]


def layer_output(model: torch.nn.Module, layer: torch.nn.Module, input_ids, attention_mask) -> torch.Tensor:
    """[batch, length, hidden] output of `layer` (inside `model`) in a forward of `model` on the batch."""
    captured = []

    def hook(module, args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = layer.register_forward_hook(hook)
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured[0]


class RMUModule(L.LightningModule):
    """Trains `model` with the RMU loss on preference batches ([retain = chosen rows; forget = rejected rows]);
    `frozen(input_ids, attention_mask)` gives the frozen model's activations at the same layer."""

    configure_optimizers = SFTModule.configure_optimizers  # same AdamW + warm-up/cosine, same hparam names

    def __init__(
        self,
        model: torch.nn.Module,
        layer: torch.nn.Module,
        frozen,
        control: torch.Tensor,
        retain_weight: float,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        self.model, self.frozen, self.retain_weight = model, frozen, retain_weight
        self._layer = [layer]  # a module inside `model`, not registered twice
        self.register_buffer("control", control, persistent=False)
        self.save_hyperparameters(ignore=["model", "layer", "frozen", "control", "retain_weight"])

    def training_step(self, batch, batch_idx):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        retain_tokens, forget_tokens = (batch["labels"] != IGNORE).chunk(2)
        retain, forget = layer_output(self.model, self._layer[0], ids, mask).chunk(2)
        size = batch["index"].shape[0]
        with torch.no_grad():
            frozen = self.frozen(ids[:size], mask[:size])
        control = self.control.to(forget.dtype)
        loss = rmu_loss(forget, retain, frozen, control, forget_tokens, retain_tokens, self.retain_weight)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(
            {
                "train/forget_mse": masked_mse(forget, control, forget_tokens).detach(),
                "train/retain_mse": masked_mse(retain, frozen, retain_tokens).detach(),
            },
            batch_size=size,
        )
        return loss * size / batch.get("loss_normalizer", size)


@method("rmu")
class RMU(Method):
    def train(self, stages, base, cfg, dataset_cfg):
        refuse_packing(stages.cfg, self.name)
        data = preference_data(stages, base, cfg, dataset_cfg)
        copied = None if cfg.lora else copy.deepcopy(base.model).requires_grad_(False).eval()
        policy = trainable(base.model, plain(cfg.lora))
        disable_dropout(policy)
        layer = decoder_layer(policy, cfg.layer)
        if copied is None:
            frozen_model, frozen_layer, adapter_off = policy, layer, policy.disable_adapter
        else:
            frozen_model, frozen_layer, adapter_off = copied, decoder_layer(copied, cfg.layer), contextlib.nullcontext

        def frozen(input_ids, attention_mask):
            if copied is not None:
                copied.to(input_ids.device)  # the copy is no submodule of the trained one: it follows it here
            with adapter_off():
                return layer_output(frozen_model, frozen_layer, input_ids, attention_mask)

        generator = torch.Generator().manual_seed(stages.cfg.seed)
        control = rmu_control_vector(policy.config.hidden_size, cfg.steering_coeff, generator)
        module = RMUModule(
            policy,
            layer,
            frozen,
            control,
            cfg.retain_weight,
            lr=cfg.lr,
            weight_decay=cfg.weight_decay,
            warmup_ratio=cfg.warmup_ratio,
            min_lr_ratio=cfg.min_lr_ratio,
        )
        return policy, stages.fit(self.name, module, data, cfg.batch_size, cfg.epochs, stages.cfg.seed)
