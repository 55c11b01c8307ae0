"""LoRA adapters through peft: attach for training (or full fine-tuning), save as safetensors, load onto a base."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model


def attach_lora(
    model,
    r: int,
    alpha: float,
    dropout: float = 0.0,
    target_modules: list[str] | str = "all-linear",
    adapter_name: str = "default",
) -> PeftModel:
    config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules, bias="none", task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def trainable(model, lora: dict | None):
    """The model to train: with a fresh LoRA adapter (`lora` = attach_lora's arguments), or, for full fine-tuning
    (`lora` None), the model itself with every weight trainable (a merged earlier stage leaves them frozen)."""
    if lora:
        return attach_lora(model, **lora)
    model.requires_grad_(True)
    return model


def save_adapter(model: PeftModel, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)


def load_adapter(model, folder: Path, adapter_name: str = "default") -> PeftModel:
    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=adapter_name)
        return model
    return PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
