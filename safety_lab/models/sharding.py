"""Sharded training (FSDP) for any LightningModule that keeps its network in `self.model`.

Two paths, one wrapping rule (one FSDP unit per decoder layer, plus the root), because mixing frozen base weights
and trainable LoRA weights of many layers in one unit costs the gradient memory of the frozen ones:

- FSDP2 (`FSDP2Strategy`, Lightning's `ModelParallelStrategy` as pure data parallelism): the module's
  `configure_model` calls `shard(self)`, which applies `fully_shard` per decoder layer. It runs on CPU with gloo.
- FSDP1 (Lightning's `FSDPStrategy`, GPU only): the strategy wraps by `DecoderLayerPolicy`, also usable as its
  activation-checkpointing policy.

Training mutates the module in place (parameters become shards), so `Stages.fit` trains a copy and afterwards
loads `full_state_dict` — every shard gathered on every rank — into the caller's plain model, which is then saved
(adapter-only or whole) and evaluated like any unsharded model.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

MIXED_PRECISION = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


class FSDP2Strategy(ModelParallelStrategy):
    """FSDP2 over every process (no tensor parallelism); `reshard_after_forward=False` keeps the gathered weights
    from forward to backward (the SHARD_GRAD_OP analogue: more memory, one all-gather fewer)."""

    def __init__(self, reshard_after_forward: bool = True, **kwargs):
        super().__init__(tensor_parallel_size=1, **kwargs)
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()


def is_sharded(strategy) -> bool:
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy))


def no_split_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules whose class a Hugging Face model lists in `_no_split_modules`, its decoder layers in any
    architecture: one FSDP unit each."""
    names = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    return [m for m in model.modules() if type(m).__name__ in names]


class DecoderLayerPolicy:
    """FSDP1 auto-wrap (and activation-checkpointing) policy: wrap each decoder layer. The layer class names are
    read from the `_no_split_modules` of the Hugging Face models met on the way down, so any architecture works."""

    def __init__(self):
        self.names: set[str] = set()

    def __call__(self, module: torch.nn.Module, recurse: bool, nonwrapped_numel: int = 0) -> bool:
        self.names.update(getattr(module, "_no_split_modules", None) or ())
        return True if recurse else type(module).__name__ in self.names


def shard(lightning_module) -> None:
    """Call from `configure_model`: under `FSDP2Strategy`, `fully_shard` each decoder layer of
    `lightning_module.model`, then the model; under any other strategy, nothing."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    strategy = lightning_module.trainer.strategy
    model = lightning_module.model
    if not isinstance(strategy, FSDP2Strategy) or isinstance(model, FSDPModule):
        return
    dtype = MIXED_PRECISION.get(str(lightning_module.trainer.precision))
    options = {
        "mesh": lightning_module.device_mesh["data_parallel"],
        "reshard_after_forward": strategy.reshard_after_forward,
        "mp_policy": MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        if dtype
        else MixedPrecisionPolicy(),
    }
    for layer in no_split_layers(model):
        fully_shard(layer, **options)
    fully_shard(model, **options)


def full_state_dict(sharded_root: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of a (FSDP1 or FSDP2) sharded module, gathered whole on every rank, on CPU.
    A collective: all ranks must call it."""
    state = get_model_state_dict(sharded_root, options=StateDictOptions(full_state_dict=True))
    return {name: tensor.detach().cpu() for name, tensor in state.items()}
