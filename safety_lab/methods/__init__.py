"""Training methods, selected with `method=<name>`: each is a `Method` subclass registered with `@method("<name>")`.

A method turns a base model and a dataset into a tuned model; `Stages.apply` stores its output as an artifact named by
its recipe and loads it back on reuse. Methods that train a LoRA adapter inherit saving and loading from `Method`.
A new method is its module here (found by `build_method`, which imports every module of this package) and its YAML,
`conf/method/<name>.yaml`, starting from `schema` or from the schema of its own settings: a `MethodConfig` subclass
in config.py whose `name` defaults to the method's, stored as `schema_<name>` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import TYPE_CHECKING

from peft import PeftModel

from safety_lab.data.records import Example, Preference, UnpairedPreference
from safety_lab.errors import SafetyLabError
from safety_lab.models.factory import load_pretrained, save_pretrained
from safety_lab.models.lora import load_adapter, save_adapter

if TYPE_CHECKING:
    from safety_lab.stages import Model, Stages


class Method:
    name: str  # set by @method

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


METHODS: dict[str, type[Method]] = {}

# each kind of training record: its name in messages, and a dataset config that gives it
RECORDS = {
    Example: ("examples (prompt, response)", "safety_sft"),
    Preference: ("preference pairs (prompt, chosen, rejected)", "preferences"),
    UnpairedPreference: ("unpaired preferences (prompt, completion, label)", "unpaired_synthetic"),
}


def training_records(stages: Stages, method_cfg, dataset_cfg, *kinds: type) -> list:
    """The dataset's records when they are of one of `kinds` (a dataset gives records of one kind), else one line
    naming what the method needs and what the dataset gives."""
    records = stages.examples(dataset_cfg)
    if records and isinstance(records[0], kinds):
        return records
    dataset = f"dataset.view={view}" if (view := dataset_cfg.get("view")) else f"dataset.path={dataset_cfg.get('path')}"
    gives = RECORDS[type(records[0])][0] if records else "no records"
    needs = ", or ".join(f"{RECORDS[kind][0]}, e.g. dataset={RECORDS[kind][1]}" for kind in kinds)
    raise SafetyLabError(f"method={method_cfg.name} needs {needs}; {dataset} gives {gives}")


def method(name: str):
    """Class decorator: registers a `Method` subclass as `method=<name>`."""

    def register(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS[name] = cls
        return cls

    return register


def build_method(name: str) -> Method:
    """The method registered as `name` (every module of this package imported first, so each has registered)."""
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")
    if name not in METHODS:
        raise SafetyLabError(f"method={name!r} is not one of {sorted(METHODS)}")
    return METHODS[name]()
