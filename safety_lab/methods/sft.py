"""Supervised fine-tuning as a LightningModule: also how the synthetic base model is pretrained.

AdamW over the trainable parameters only (a LoRA adapter, or the whole model), linear warm-up then cosine decay,
stepped per optimiser step so the schedule is independent of gradient accumulation. The loss is the per-token mean
over the *global* batch however it is split into micro-batches and ranks; `configure_model` shards the model under
FSDP2 (models/sharding.py). With `model.packing=true` SFT's batches are packed, without padding (packing.py).
"""

from __future__ import annotations

import math

import lightning as L
import torch

from safety_lab.config import plain
from safety_lab.data.collate import IGNORE, TokenizedExamples
from safety_lab.data.records import Example, Preference
from safety_lab.methods import Method, method, training_records
from safety_lab.methods.losses import token_cross_entropy
from safety_lab.methods.packing import packed_if, packed_logps, sequences
from safety_lab.models.lora import trainable
from safety_lab.models.sharding import shard


def warmup_cosine(warmup: int, total: int, floor: float = 0.0):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class SFTModule(L.LightningModule):
    def __init__(
        self,
        model,
        lr: float,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.98),
        min_lr_ratio: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.save_hyperparameters(ignore=["model"])

    def configure_model(self):
        shard(self)

    def training_step(self, batch, batch_idx):
        if "targets" in batch:  # packed (packing.py)
            logps, counts = packed_logps(self.model, batch)
            summed, tokens = -logps.sum(), counts.sum().clamp(min=1)
        else:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            summed = token_cross_entropy(logits, batch["labels"], reduction="sum")
            tokens = (batch["labels"][:, 1:] != IGNORE).sum().clamp(min=1)
        self.log("train/loss", summed / tokens, prog_bar=True, batch_size=sequences(batch))
        # the global batch's per-token mean once accumulated and averaged over ranks (data/batching.py)
        return summed / batch.get("loss_normalizer", tokens)

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for p in self.trainer.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, betas=tuple(hp.betas))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        schedule = warmup_cosine(max(1, int(hp.warmup_ratio * total)), total, hp.min_lr_ratio)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def chosen_examples(records: list) -> list[Example]:
    """Training examples; a preference pair trains on its chosen answer (the SFT baseline of preference studies)."""
    return [Example(r.prompt, r.chosen) if isinstance(r, Preference) else r for r in records]


def sft_data(stages, base, method_cfg, dataset_cfg) -> TokenizedExamples:
    """The dataset's examples (a preference pair's chosen side), tokenised for `SFTModule`."""
    return TokenizedExamples(
        chosen_examples(training_records(stages, base, method_cfg, dataset_cfg, Example, Preference)),
        base.tokenizer,
        stages.template,
        stages.cfg.model.max_length,
        method_cfg.train_on_prompt,
    )


def optimiser_settings(method_cfg) -> dict:
    m = method_cfg
    return {"lr": m.lr, "weight_decay": m.weight_decay, "warmup_ratio": m.warmup_ratio, "min_lr_ratio": m.min_lr_ratio}


@method("sft")
class SFT(Method):
    def module(self, tuned, stages, base, method_cfg) -> SFTModule:
        """The LightningModule that trains `tuned` (SFT's variants give their own)."""
        return SFTModule(tuned, **optimiser_settings(method_cfg))

    def train(self, stages, base, method_cfg, dataset_cfg):
        m = method_cfg
        data = packed_if(stages.cfg, sft_data(stages, base, m, dataset_cfg))
        tuned = trainable(base.model, plain(m.lora))
        module = self.module(tuned, stages, base, m)
        return tuned, stages.fit(self.name, module, data, m.batch_size, m.epochs, stages.cfg.seed)
