"""Training methods, selected with `method=<name>`: each is a `Method` registered in `METHODS`.

A method turns a base model and a dataset into a tuned model; `Stages.apply` stores its output as an artifact named by
its recipe and loads it back on reuse. Methods that train a LoRA adapter inherit saving and loading from `Method`.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from peft import PeftModel

from safety_lab.models.factory import load_pretrained, save_pretrained
from safety_lab.models.lora import load_adapter, save_adapter

if TYPE_CHECKING:
    from safety_lab.stages import Model, Stages


class Method:
    name: str

    def train(self, stages: Stages, base: Model, method_cfg, dataset_cfg):
        """(`base.model` tuned — a PeftModel for adapter methods —, metrics of its training), fitted through
        `stages.fit`."""
        raise NotImplementedError

    def check(self, method_cfg) -> None:
        """Raise `SafetyLabError` for settings that cannot work together; called before any model loads."""

    def kind(self, method_cfg) -> str:
        return "adapter" if method_cfg.get("lora") else "model"

    def save(self, model, tokenizer, folder: Path) -> None:
        save_adapter(model, folder) if isinstance(model, PeftModel) else save_pretrained(model, tokenizer, folder)

    def load(self, model, folder: Path):
        return load_adapter(model, folder) if (folder / "adapter_config.json").exists() else load_pretrained(folder)[0]


def registry() -> dict[str, Method]:
    from safety_lab.methods.dpo import DPO
    from safety_lab.methods.mask_dpo import MaskDPO
    from safety_lab.methods.sft import SFT
    from safety_lab.methods.unlearn import Unlearn

    return {m.name: m for m in (SFT(), DPO(), Unlearn(), MaskDPO())}
