"""`method=antidote`: Antidote (Huang et al. 2025), post-fine-tuning one-shot pruning of harmful weights.

The user's fine-tune (`method.finetune`, a method config: `+method@method.finetune=sft`, or the grid's attack method
in conf/defense/antidote.yaml; on the run's `dataset`, the same stage recipe as that fine-tune run alone, so it is
reused from the store) is run over harmful data (`method.harmful`, Antidote's re-alignment set of harmful
prompts with harmful answers) with forward hooks summing each LoRA factor's squared inputs over every non-padding
token; `fusion.prune.antidote` then zeroes, row by row, the `prune_ratio` share of adapter weights with the highest
Wanda score |W|·‖X‖ (Antidote's LoRA mode: its scripts' dense ratio 0.1 on 2,000 harmful samples). Nothing is trained;
the pruned adapter is the stage's output.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer

from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.records import Example
from safety_lab.errors import SafetyLabError
from safety_lab.fusion.prune import antidote
from safety_lab.fusion.task_vectors import base_weight_name, lora_factors
from safety_lab.methods import Method, method, training_records
from safety_lab.models.factory import eval_mode


@torch.no_grad()
def input_sq_sums(model: PeftModel, data: TokenizedExamples, batch_size: int) -> dict[str, torch.Tensor]:
    """Σ x_j² over every non-padding token of `data`, per input feature of each LoRA factor, keyed as `lora_factors`
    keys them (`<base weight>.lora_A` / `.lora_B`)."""
    sums, handles, mask = {}, [], {}

    def record(key: str):
        def hook(module, args):
            x = args[0].float() * mask["tokens"].unsqueeze(-1)
            sums[key] = sums.get(key, 0) + x.pow(2).sum(dim=(0, 1))

        return hook

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            for factor in ("lora_A", "lora_B"):
                key = f"{base_weight_name(name)}.{factor}"
                handles.append(getattr(module, factor)["default"].register_forward_pre_hook(record(key)))
    try:
        with eval_mode(model):
            for start in range(0, len(data), batch_size):
                batch = data.collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
                mask["tokens"] = batch["attention_mask"].to(model.device).float()
                model(input_ids=batch["input_ids"].to(model.device), attention_mask=mask["tokens"])
    finally:
        for handle in handles:
            handle.remove()
    return sums


@method("antidote")
class Antidote(Method):
    def check(self, method_cfg) -> None:
        if not method_cfg.finetune:
            raise SafetyLabError(
                "method.finetune=null: method=antidote prunes a fine-tune; give its method, e.g. "
                "+method@method.finetune=sft"
            )
        if not method_cfg.finetune.get("lora"):
            raise SafetyLabError(
                "method.finetune.lora=null: method=antidote prunes the fine-tune's LoRA adapter; give it one"
            )

    def kind(self, method_cfg) -> str:
        return "adapter"

    def train(self, stages, base, method_cfg, dataset_cfg):
        m = method_cfg
        tuned = stages.apply(base, m.finetune, dataset_cfg).model
        harmful = TokenizedExamples(
            training_records(stages, base, m, m.harmful, Example),
            base.tokenizer,
            stages.template,
            stages.cfg.model.max_length,
        )
        pruned, shares = antidote(lora_factors(tuned), input_sq_sums(tuned, harmful, m.batch_size), m.prune_ratio)
        with torch.no_grad():
            for name, module in tuned.named_modules():
                if isinstance(module, LoraLayer) and "default" in module.lora_A:
                    for factor in ("lora_A", "lora_B"):
                        weight = getattr(module, factor)["default"].weight
                        weight.copy_(pruned[f"{base_weight_name(name)}.{factor}"].to(weight.dtype))
        return tuned, {"antidote/pruned_share": sum(shares.values()) / len(shares)}
