"""Structured-config schemas: types and allowed values are checked when Hydra composes, before anything loads.

Each config group's YAML files start from the schema stored here under the name `schema` (`defaults: [schema,
_self_]`), so a wrong type or an unknown choice fails with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf

from safety_lab.errors import SafetyLabError
from safety_lab.worlds.synthetic.world import WorldSpec


def plain(node):
    """A config node as plain Python values (interpolations resolved, enums as their strings); anything else as is."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True, enum_to_str=True)
    return node


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
    system: str | None = None
    prefix: str = ""
    preset: str | None = None  # a named system prompt + prefix in data.template.PRESETS (e.g. aoa)
    chat_template: str | None = None  # chat: a Jinja template (text or .jinja file) replacing the tokenizer's


@dataclass
class PretrainConfig:
    """The synthetic base's recipe: SFT on the `pretrain` view, where every prompt is complied with."""

    n: int = 128_000
    epochs: int = 1
    batch_size: int = 128
    lr: float = 4e-3
    warmup_ratio: float = 0.05
    seed: int = 0
    args: dict[str, Any] = field(default_factory=dict)  # of the `pretrain` view, e.g. obey_fraction


@dataclass
class ModelConfig:
    kind: ModelKind = ModelKind.tiny_llama
    path: str | None = None  # hf: hub id or local folder
    gguf_file: str | None = None  # hf: a GGUF file inside `path`, dequantised once into the store
    dtype: str = "float32"
    quantization: str | None = None  # hf, GPU only: load in "8bit" or "4bit" (bitsandbytes)
    allow_pickle: bool = False  # hf: load a local folder's pickle weights (pytorch_model.bin), with weights_only
    hidden_size: int = 96
    num_layers: int = 3
    num_heads: int = 3
    intermediate_size: int = 384
    max_position_embeddings: int = 128
    max_length: int = 128  # training sequences are cut to this many tokens
    gradient_checkpointing: bool = False  # recompute activations in backward (real models; not in recipes)
    # torch.compile the model for fits of at least this many optimiser steps (null: never; needs a C++ compiler on
    # CPU). ~10 s of compiling per process; 300 makes the quickstart's cold run 6-14% faster (pretraining's 1000 steps).
    # Off by default: compiled weights differ from eager ones by rounding (like thread counts, not in recipes), and
    # the documented studies were trained eagerly.
    compile_min_steps: int | None = None
    pretrain: PretrainConfig | None = None
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
    lora: LoraSettings | None = None


class LogProb(str, Enum):
    sum = "sum"  # summed over response tokens (TRL, SOMF)
    mean = "mean"  # averaged over response tokens
    fixed = "fixed"  # summed, divided by `fixed_length` (Jain et al.: 159)


@dataclass
class DPOConfig(MethodConfig):
    name: str = "dpo"
    beta: float = 0.1
    beta_rejected: float | None = None  # default: beta (Jain et al.: 0.1 chosen, 0.01 rejected)
    logp: LogProb = LogProb.sum
    fixed_length: int | None = None  # logp=fixed
    ref_batch_size: int = 64  # batch size of the one-off reference log-prob pass


class UnlearnLoss(str, Enum):
    ascent = "ascent"  # gradient ascent on the dispreferred response (set retain_weight 0 for the pure form)
    graddiff = "graddiff"  # gradient difference: descent on the preferred, ascent on the dispreferred
    npo = "npo"  # negative preference optimisation on the dispreferred, descent on the preferred


@dataclass
class UnlearnConfig(MethodConfig):
    name: str = "unlearn"
    loss: UnlearnLoss = UnlearnLoss.graddiff
    retain_weight: float = 1.0
    forget_weight: float = 0.1
    beta: float = 0.1  # npo
    clamp: float | None = None  # ascent/graddiff: a sequence NLL past this stops being pushed up
    logp: LogProb = LogProb.mean
    fixed_length: int | None = None
    ref_batch_size: int = 64


# Objectives beside DPO and `unlearn`'s, each its own method with its paper's defaults (methods/dpo.py,
# reference_free.py, kto.py, unlearn.py, rmu.py), so `method=dpo`, `method=unlearn` and every stored recipe stay as they
# were.
@dataclass
class IPOConfig(DPOConfig):
    name: str = "ipo"
    beta: float = 0.1  # τ of Azar et al.
    logp: LogProb = LogProb.mean  # TRL's IPO: per-token mean log-probs


@dataclass
class CDPOConfig(DPOConfig):
    name: str = "cdpo"
    label_smoothing: float = 0.1  # ε: the probability a preference label is flipped, in [0, 0.5)


@dataclass
class RobustDPOConfig(CDPOConfig):
    name: str = "robust_dpo"


@dataclass
class SimPOConfig(MethodConfig):
    name: str = "simpo"
    beta: float = 2.0
    gamma_beta_ratio: float = 0.5  # γ/β: the target margin γ is beta · gamma_beta_ratio


@dataclass
class ORPOConfig(MethodConfig):
    name: str = "orpo"
    odds_ratio_weight: float = 0.1  # λ of L_SFT + λ·L_OR


@dataclass
class KTOConfig(MethodConfig):
    name: str = "kto"
    beta: float = 0.1
    desirable_weight: float = 1.0  # λ_D
    undesirable_weight: float = 1.0  # λ_U
    ref_batch_size: int = 64


@dataclass
class SimNPOConfig(MethodConfig):
    name: str = "simnpo"
    beta: float = 2.5
    gamma: float = 0.0  # the margin γ >= 0
    retain_weight: float = 1.0
    forget_weight: float = 1.0


@dataclass
class RMUConfig(MethodConfig):
    name: str = "rmu"
    layer: int = 1  # the decoder layer whose output is steered (WMDP: 7 of Zephyr-7B's 32)
    steering_coeff: float = 6.5  # c: forget activations are pushed to c·u, u a fixed random unit vector
    retain_weight: float = 1200.0  # α: weight of the retain activations' distance to the frozen model's


class MaskSpace(str, Enum):
    dense = "dense"  # one mask entry per entry of ΔW = B·A of each adapted weight
    factors = "factors"  # masks over the LoRA factors A and B separately (SOMF's code)


class MaskExport(str, Enum):
    none = "none"  # no mask: the unmasked fine-tuned model (the reference), no mask is trained
    expected = "expected"  # σ(ℓ)
    threshold = "threshold"  # 1[σ(ℓ) > 0.5]
    sample = "sample"  # one seeded Bernoulli(σ(ℓ)) draw
    topk = "topk"  # the `top_k` fraction of largest logits of each tensor


class MaskMerge(str, Enum):  # merges of fusion.merges.MERGES that take any number of inputs
    task_arithmetic = "task_arithmetic"  # λ·Σ_i m ⊙ τ_i / mean(m)
    ties = "ties"  # TIES over the masked vectors, times λ, as SOMF's multi-task realignment


@dataclass
class MaskSettings:
    space: MaskSpace = MaskSpace.dense
    init_logit: float = 0.0  # SOMF: 0, i.e. p = 0.5 everywhere at the start
    temperature: float = 0.5
    sparsity: float = 0.0  # weight of the mean-σ(ℓ) penalty (SOMF: none)


@dataclass
class MaskDPOConfig(DPOConfig):
    name: str = "mask_dpo"
    tasks: dict[str, Any] = field(default_factory=dict)  # name -> stage {method, dataset}: the task adapters
    task_weight: float = 1.0  # λ of the merge of the masked task vectors inside the forward (as fusion.weight)
    merge: MaskMerge = MaskMerge.task_arithmetic
    merge_args: dict[str, Any] = field(default_factory=dict)  # the merge's own arguments (as fusion.args)
    mask: MaskSettings = field(default_factory=MaskSettings)
    export: MaskExport = MaskExport.expected  # how the trained mask becomes the realigned model
    export_seed: int = 0  # export=sample
    top_k: float = 0.5  # export=topk


@dataclass
class DatasetConfig:
    source: Source = Source.synthetic
    view: str | None = None  # synthetic: a name in worlds.synthetic.views.TRAIN_VIEWS
    n: int = 4000
    seed: int = 0
    args: dict[str, Any] = field(default_factory=dict)  # synthetic: extra arguments of the view
    path: str | None = None  # file: local path, folder or hub id
    split: str = "train"
    adapter: str | None = None  # file: a layout adapter in safety_lab.data.adapters.ADAPTERS (args go to it)
    prompt_key: str = "prompt"
    response_key: str = "response"
    preferences: bool = False  # file: rows are (prompt, chosen, rejected) preference pairs
    label_key: str | None = None  # file: rows are unpaired (prompt, completion: response_key, this boolean column)


@dataclass
class SuiteConfig:
    source: Source = Source.synthetic
    view: str | None = None  # synthetic suite name; defaults to the suite's own name
    n: int | None = None  # defaults to eval.n
    seed: int = 0
    lang: int = 0
    prefix: list[str] = field(default_factory=list)
    path: str | None = None  # file: local path, folder or hub id
    split: str = "train"
    adapter: str | None = None  # file: a layout adapter in safety_lab.data.adapters.ADAPTERS
    args: dict[str, Any] = field(default_factory=dict)  # file: the adapter's arguments, and `where` filters
    prompt_key: str = "prompt"
    unsafe: bool | None = None  # file: the label of every prompt in the file...
    unsafe_key: str | None = None  # ...or the column holding each prompt's label


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks run on the in-memory model (eval/lm_eval_bridge.py)."""

    tasks: list[Any] = field(default_factory=list)  # registry names (hub data) or tasks of include_path's YAMLs
    include_path: str | None = None  # a folder of local task YAMLs; then only those tasks are indexed
    num_fewshot: int | None = None
    limit: int | None = None  # documents per task
    batch_size: int = 8
    apply_chat_template: bool = False


class BestMode(str, Enum):
    max = "max"
    min = "min"


@dataclass
class KeepBest:
    """Publish the weights of the evaluated step where `metric` (`<suite>/<metric>`) is best, not the last step's."""

    metric: str | None = None  # null: off (the last step's weights are published)
    mode: BestMode = BestMode.max


@dataclass
class DuringTrainingConfig:
    """Chosen suites evaluated every `every_n_steps` optimiser steps inside each stage's fit
    (safety_lab/eval/during_training.py): curves in the logger, training_curves.csv/.png in the run folder."""

    every_n_steps: int | None = None  # null: off
    suites: list[str] | None = None  # names in eval.suites; null: all of them
    n: int | None = None  # the first n prompts of each suite; null: the whole suite
    save_checkpoints: bool = False  # keep each evaluated step's trained weights in <run>/checkpoints/ (.ckpt)
    keep_best: KeepBest = field(default_factory=KeepBest)  # part of the stage's recipe when a metric is set


@dataclass
class EvalConfig:
    judge: str = "exact"
    judge_args: dict[str, Any] = field(default_factory=dict)
    n: int = 200
    batch_size: int = 256
    max_new_tokens: int | None = None  # default: the world's longest answer + 2
    base: bool = True  # also evaluate the model before the method, reported under `base.`
    suites: dict[str, Any] = field(default_factory=dict)  # SuiteConfig each, checked by sources.checked_suite
    lm_eval: LmEvalConfig | None = None  # utility through lm-evaluation-harness, beside the suites
    during_training: DuringTrainingConfig = field(default_factory=DuringTrainingConfig)


@dataclass
class AttackConfig:
    n: int = 32  # unsafe prompts attacked with soft tokens
    tokens: list[int] = field(default_factory=lambda: [1, 2, 4])  # numbers of inserted soft tokens
    steps: int = 30
    report_at: list[int] = field(default_factory=lambda: [5, 10, 20])  # steps at which success is also recorded
    bound: float | None = None  # L2 bound of each soft token; default: the mean token-embedding norm


@dataclass
class AnalysisConfig:
    """The mechanistic study (safety_lab.analysis.study): which models, which suites play which part."""

    models: dict[str, Any] = field(default_factory=dict)  # tag -> stage {method, dataset} applied to the base
    analyses: list[str] | None = None  # which analyses run (analysis/study.py ANALYSES); null: all of them
    safe_suite: str = "utility"
    unsafe_suite: str = "harmful"
    jailbreak_suites: list[str] = field(default_factory=lambda: ["jailbreak_competing", "jailbreak_mismatch"])
    refusal: str = "refuse"  # the refusal text; its first token is the refusal token of the refusal score
    energy: float = 0.9  # column space: top-k singular directions holding this share of Σσ²
    row_space_k: int = 10  # row space: top right singular vectors of ΔW
    lipschitz_n: int = 100  # prompts per side (safe, unsafe) whose input gradients are taken
    attack: AttackConfig = field(default_factory=AttackConfig)


class TaskName(str, Enum):
    evaluate = "evaluate"  # the base and the run's method, side by side (safety_lab/tasks/evaluate.py)
    fuse = "fuse"  # trained stages fused at weight λ, each λ evaluated (needs `fusion`)
    analyse = "analyse"  # the mechanistic study (needs `analysis`)


@dataclass
class TaskConfig:
    """Which kind of run this is (safety_lab/tasks/)."""

    name: TaskName = TaskName.evaluate


@dataclass
class FusionConfig:
    """Trained stages fused into the model by a merge of `safety_lab.fusion.merges.MERGES`, then evaluated."""

    merge: str = "lora_weighted"
    weight: float = 0.5  # λ; what it scales depends on the merge (MERGES[merge].weight)
    weights: list[float] | None = None  # an in-process sweep: every λ evaluated on one loaded model
    args: dict[str, Any] = field(default_factory=dict)  # the merge's own hyperparameters
    inputs: dict[str, Any] = field(default_factory=dict)  # role -> stage {method, dataset, weight (default 1)}


def register() -> None:
    """Store each group's schema as `<group>/schema`, and each method's own settings (a `MethodConfig` subclass) as
    `method/schema_<its name>`."""
    cs = ConfigStore.instance()
    for group, node in (
        ("world", WorldSpec),
        ("model", ModelConfig),
        ("method", MethodConfig),
        ("dataset", DatasetConfig),
        ("eval", EvalConfig),
        ("analysis", AnalysisConfig),
        ("fusion", FusionConfig),
        ("task", TaskConfig),
    ):
        cs.store(group=group, name="schema", node=node)
    schemas = MethodConfig.__subclasses__()
    while schemas:
        schema = schemas.pop(0)
        cs.store(group="method", name=f"schema_{schema.name}", node=schema)
        schemas += schema.__subclasses__()


# Numeric settings whose range is known, checked by key name wherever they occur (the run's method, the align, fusion
# and mask-DPO task stages, datasets, suites, merge arguments); an unset (null) value keeps its default.
POSITIVE = ("lr", "beta", "beta_rejected", "steering_coeff")
AT_LEAST_ONE = (
    "epochs",
    "n",
    "batch_size",
    "ref_batch_size",
    "accumulate_grad_batches",
    "max_new_tokens",
    "r",
    "steps",
    "lipschitz_n",
    "row_space_k",
    "threads",
    "every_n_steps",
)
NON_NEGATIVE = (
    "weight_decay",
    "gradient_clip_val",
    "retain_weight",
    "forget_weight",
    "sparsity",
    "alpha",
    "gamma_beta_ratio",
    "odds_ratio_weight",
    "desirable_weight",
    "undesirable_weight",
    "layer",
)
PROBABILITY = ("warmup_ratio", "min_lr_ratio", "dropout", "obey_fraction", "drop_rate", "density", "top_k", "energy")
RANGES = {
    "label_smoothing": ("in [0, 0.5)", lambda v: 0 <= v < 0.5),  # cdpo, robust_dpo
    **{k: ("> 0", lambda v: v > 0) for k in POSITIVE},
    **{k: (">= 1", lambda v: v >= 1) for k in AT_LEAST_ONE},
    **{k: (">= 0", lambda v: v >= 0) for k in NON_NEGATIVE},
    **{k: ("in [0, 1]", lambda v: 0 <= v <= 1) for k in PROBABILITY},
}
UNCHECKED = ("hydra", "judge_args", "trainer")  # other programs' settings, checked by those programs


def check_values(node, path: str = "") -> None:
    """Raise one `SafetyLabError` line naming the first numeric setting outside its known range (RANGES), or not
    finite, e.g. `method.lr=-0.001: must be > 0`."""
    items = node.items() if isinstance(node, DictConfig) else enumerate(node) if isinstance(node, ListConfig) else ()
    for key, value in items:
        where = f"{path}.{key}" if path else str(key)
        if isinstance(value, (DictConfig, ListConfig)):
            if key not in UNCHECKED:
                check_values(value, where)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise SafetyLabError(f"{where}={value}: must be a finite number")
            if key in RANGES and not RANGES[key][1](value):
                raise SafetyLabError(f"{where}={value}: must be {RANGES[key][0]}")
