"""Structured-config schemas: types and allowed values are checked when Hydra composes, before anything loads.

Each config group's YAML files start from the schema stored here under the name `schema` (`defaults: [schema,
_self_]`), so a wrong type or an unknown choice fails with one line naming the key, the value and what is allowed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from safety_lab.worlds.synthetic.world import WorldSpec


class ModelKind(str, Enum):
    tiny_llama = "tiny_llama"  # built from a LlamaConfig, pretrained on the synthetic world (a store recipe)
    hf = "hf"  # any causal LM by hub id or local folder


class Source(str, Enum):
    synthetic = "synthetic"  # a view of the synthetic world
    file = "file"  # a local JSON/JSONL/CSV/Parquet file, or a hub dataset id


class TemplateKind(str, Enum):
    plain = "plain"
    chat = "chat"


@dataclass
class TemplateConfig:
    kind: TemplateKind = TemplateKind.plain
    system: Optional[str] = None
    prefix: str = ""


@dataclass
class PretrainConfig:
    """The synthetic base's recipe: SFT on the `pretrain` view, where every prompt is complied with."""

    n: int = 128_000
    epochs: int = 1
    batch_size: int = 128
    lr: float = 4e-3
    warmup_ratio: float = 0.05
    seed: int = 0


@dataclass
class ModelConfig:
    kind: ModelKind = ModelKind.tiny_llama
    path: Optional[str] = None  # hf: hub id or local folder
    gguf_file: Optional[str] = None  # hf: a GGUF file inside `path` (dequantised on load)
    dtype: str = "float32"
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 3
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    max_length: int = 128  # training sequences are cut to this many tokens
    pretrain: Optional[PretrainConfig] = None
    template: TemplateConfig = field(default_factory=TemplateConfig)


@dataclass
class LoraSettings:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Any = "all-linear"


@dataclass
class MethodConfig:
    name: str = "sft"
    lr: float = 1e-3
    epochs: int = 1
    batch_size: int = 64
    weight_decay: float = 0.0
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    train_on_prompt: bool = False
    lora: Optional[LoraSettings] = None


@dataclass
class DatasetConfig:
    source: Source = Source.synthetic
    view: Optional[str] = None  # synthetic: a name in worlds.synthetic.views.TRAIN_VIEWS
    n: int = 4000
    seed: int = 0
    args: dict[str, Any] = field(default_factory=dict)  # synthetic: extra arguments of the view
    path: Optional[str] = None  # file: local path or hub id
    split: str = "train"
    prompt_key: str = "prompt"
    response_key: str = "response"


@dataclass
class SuiteConfig:
    source: Source = Source.synthetic
    view: Optional[str] = None  # synthetic suite name; defaults to the suite's own name
    n: Optional[int] = None  # defaults to eval.n
    seed: int = 0
    lang: int = 0
    prefix: list[str] = field(default_factory=list)
    path: Optional[str] = None  # file: local path or hub id
    split: str = "train"
    prompt_key: str = "prompt"
    unsafe: Optional[bool] = None  # file: the label of every prompt in the file...
    unsafe_key: Optional[str] = None  # ...or the column holding each prompt's label


@dataclass
class EvalConfig:
    judge: str = "exact"
    judge_args: dict[str, Any] = field(default_factory=dict)
    n: int = 200
    batch_size: int = 256
    max_new_tokens: Optional[int] = None  # default: the world's longest answer + 2
    base: bool = True  # also evaluate the model before the method, reported under `base.`
    suites: dict[str, SuiteConfig] = field(default_factory=dict)


def register() -> None:
    cs = ConfigStore.instance()
    for group, node in (("world", WorldSpec), ("model", ModelConfig), ("method", MethodConfig),
                        ("dataset", DatasetConfig), ("eval", EvalConfig)):
        cs.store(group=group, name="schema", node=node)
