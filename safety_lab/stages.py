"""Stages: how a run trains, names and reuses every model it needs (docs/architecture.md, "Stages and recipes").

A *stage* is a (method, dataset) pair applied to a base model. `Stages` is built once per run from its config
(`Stages(cfg)`) and handed to methods, tasks and benchmarks as an argument: it fits a LightningModule with the
configured trainer and strategy (`fit`), resolves the run's base (`base`: the synthetic base is pretrained once, an
`align` stage is merged in), builds or reuses a stage on a base (`apply`), and computes every store recipe
(`recipe`), the one place that decides when an artifact is reused.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from safety_lab.artifacts import ArtifactStore
from safety_lab.checkpoints import resume_path
from safety_lab.config import ModelKind, Source, plain
from safety_lab.data.batching import ResumeState, global_batch_loader
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.eval.during_training import during_training, enabled, keep_best_recipe
from safety_lab.methods import build_method
from safety_lab.methods.sft import SFTModule
from safety_lab.models.factory import dequantise_gguf, load_pretrained, save_pretrained, tiny_llama
from safety_lab.models.sharding import full_state_dict, is_sharded
from safety_lab.onpolicy import onpolicy_pairs
from safety_lab.sources import load_examples, mix_parts
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World, WorldSpec

log = logging.getLogger(__name__)
for _name in ("lightning.pytorch", "lightning.fabric"):  # their banners ("GPU available: False", tips) add nothing
    logging.getLogger(_name).setLevel(logging.WARNING)
# Model settings that do not change the synthetic base's weights (or only apply to real models).
NOT_IN_BASE_RECIPE = (
    "template",
    "gradient_checkpointing",
    "compile_min_steps",
    "packing",
    "quantization",
    "allow_pickle",
)
# Trainer settings that change nothing about the trained weights, so they stay out of recipes.
COSMETIC = {
    "log_every_n_steps",
    "enable_checkpointing",
    "enable_model_summary",
    "enable_progress_bar",
    "num_sanity_val_steps",
}
# Dataset settings added after stores existed: left out of a recipe while null or empty, so entries made before keep
# their names.
ADDED_LATER = ("label_key", "mix")


def recipe_value(node, root: str = ""):
    """A recipe input as plain values, without the null or empty settings of ADDED_LATER at any depth (a mask-DPO
    task's dataset sits inside its method), and a path inside the checkout `root` relative to it, so that a store
    shared by two checkouts (a worktree, a fresh clone) reuses their entries."""
    value = plain(node)
    if isinstance(value, dict):
        return {k: recipe_value(v, root) for k, v in value.items() if not (k in ADDED_LATER and v in (None, {}))}
    if root and isinstance(value, str) and value.startswith(f"{root}/"):
        return value.removeprefix(f"{root}/")
    return value


@dataclass
class Training:
    """The stage `Stages.apply` is building: what evaluation during training needs beyond the fit's arguments."""

    tokenizer: object
    entry: str  # `<kind>/<hash>` the stage will be published as
    base: str  # the id of the model it starts from
    method: dict

    @property
    def info(self) -> dict:  # what python -m safety_lab.evaluate_checkpoints needs to rebuild the model
        return {"base": self.base, "method": self.method}


@dataclass
class Model:
    """A model in memory with its tokenizer and its id: `<kind>/<hash>` of the store entry it comes from, or the hub
    id / path it was loaded from. A stage's recipe names its base by this id."""

    model: torch.nn.Module
    tokenizer: object
    id: str


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA-adapted model with its adapter merged into the weights; any other model as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def entry_id(folder: Path) -> str:
    return f"{folder.parent.name}/{folder.name}"


@contextmanager
def compiled(model: torch.nn.Module, enabled: bool):
    """`model` torch.compile'd in place for the duration (parameter names, hence checkpoints, stay the same), with
    deterministic kernels so that a recipe trains the same weights every time (without them inductor's CPU kernels
    differ from run to run); evaluation and generation afterwards run eagerly."""
    if not enabled:
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    model.compile(dynamic=True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        model._compiled_call_impl = None
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


class StopOnNonFinite(L.Callback):
    """Ends a fit with one line naming the stage, the step and the loss as soon as the loss or a gradient is not
    finite, so that a diverged model never reaches the store."""

    def __init__(self, stage: str):
        self.stage = stage

    def fail(self, trainer, what: str):
        loss = trainer.callback_metrics.get("train/loss")
        raise SafetyLabError(
            f"{self.stage}: {what} is not finite at step {trainer.global_step} (last logged loss "
            f"{float(loss) if loss is not None else 'none'}); lower the learning rate"
        )

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss):
            self.fail(trainer, f"the loss ({float(loss)})")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.nn.utils.get_total_norm(grads)):
            self.fail(trainer, "a gradient")


class Stages:
    """The run's config, and how every stage of it is trained, named and reused. The store, the world and the prompt
    template are made from the config when first used, so a config holding only what `fit` reads (trainer,
    strategy, logger, paths) can fit."""

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg
        self.training: Training | None = None  # set by `apply` while a stage trains

    @cached_property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.cfg.paths.artifacts)

    @cached_property
    def root(self) -> str:  # the checkout, which recipes leave out of the paths inside it
        return str(self.cfg.paths.root)

    @cached_property
    def world(self) -> World:
        return World(WorldSpec(**plain(self.cfg.world)))

    @cached_property
    def template(self) -> PromptTemplate:
        return PromptTemplate(**plain(self.cfg.model.template))

    def recipe(self, kind: str, **inputs) -> dict:
        """The store recipe of an artifact of `kind` made from `inputs` (the ids of the artifacts it starts from and
        the settings that make it): what names its entry, so the only thing that decides whether it is reused.

        - `base`, the synthetic base (no inputs): the model settings that shape its weights, the world, the training.
        - `ref_logps`: its inputs alone (a data fingerprint and a hash of the reference weights).
        - anything trained on a base (`adapter`, `model`, `mask`): its inputs, the run's seed, prompt template and
          training settings, the world when its data is synthetic (a mask's recipe always holds the world), and on
          a real model `model.max_length`.

        Settings that change no weights (logging, progress bars, checkpoint cadence, compile, thread count) stay out;
        evaluation settings too, except `eval.during_training.keep_best` when set (it picks the published step).
        """
        if kind == "ref_logps":
            return inputs
        if kind == "pairs":  # greedy generations: the model, the data config and the template decide them
            return {
                **{k: recipe_value(v, self.root) for k, v in inputs.items()},
                "template": plain(self.cfg.model.template),
            }
        trainer = {k: v for k, v in plain(self.cfg.trainer).items() if k not in COSMETIC}
        training = {"trainer": trainer, "strategy": plain(self.cfg.strategy)}
        world = {"world": plain(self.cfg.world)}
        if kind == "base":
            model = {k: v for k, v in plain(self.cfg.model).items() if k not in NOT_IN_BASE_RECIPE}
            if not model["pretrain"]["args"]:  # left out when empty, so bases made before view args existed stay valid
                del model["pretrain"]["args"]
            return {"model": model, **world, **training}
        recipe = {
            **{k: recipe_value(v, self.root) for k, v in inputs.items()},
            "seed": self.cfg.seed,
            "template": plain(self.cfg.model.template),
            **training,
        }
        if kind != "mask" and (keep_best := keep_best_recipe(self.cfg)):  # absent when off: hashes unchanged
            recipe["keep_best"] = keep_best
        if self.cfg.model.kind == ModelKind.hf:  # the synthetic base's recipe holds it already
            recipe["max_length"] = self.cfg.model.max_length  # where training sequences are cut
        return {**recipe, **world} if kind == "mask" or recipe["dataset"].get("source") == "synthetic" else recipe

    def get_or_build(self, kind: str, build: Callable[[Path], dict | None], **inputs) -> Path:
        """The store entry of `recipe(kind, **inputs)`, built by `build(folder) -> metrics` on first use."""
        return self.store.get_or_build(kind, self.recipe(kind, **inputs), build)

    def examples(self, dataset_cfg, base: Model | None = None) -> list:
        """The training records of `dataset_cfg`; on-policy pairs are generated by `base` (onpolicy.py); then the
        records of each `dataset.mix` entry, as many as its fraction asks (sources.mix_parts)."""
        if dataset_cfg.source == Source.onpolicy:
            if base is None:
                raise SafetyLabError("dataset.source=onpolicy needs a model to generate with; this stage has none")
            records = onpolicy_pairs(self, base, dataset_cfg)
        else:
            records = load_examples(dataset_cfg, self.world)
        for name, part in mix_parts(dataset_cfg, len(records)).items():
            extra = self.examples(part, base)[: part.n] if part.n else []
            if len(extra) < part.n:
                raise SafetyLabError(f"dataset.mix.{name}: {part.n} records are needed, its dataset gives {len(extra)}")
            if extra and records and type(extra[0]) is not type(records[0]):
                kinds = f"{type(extra[0]).__name__}s, the dataset {type(records[0]).__name__}s"
                raise SafetyLabError(f"dataset.mix.{name} gives {kinds}: mixed records must be of one kind")
            records = records + extra
        return records

    def fit(
        self, stage: str, module: L.LightningModule, data: TokenizedExamples, batch_size: int, epochs: int, seed: int
    ) -> dict:
        """Train `module` with the configured Trainer, strategy and logger; returns the last logged metrics.

        `batch_size` is per micro-batch and process: the global batch is batch_size × accumulation × processes,
        and the order of rows does not depend on the split (data/batching.py). Inside a store build, checkpoints go
        beside the entry and a re-run resumes from the last one (`ckpt_path`). Under FSDP a copy of `module` is
        trained and its shards gathered back into `module`, so the caller always gets a plain model back.
        """
        cfg = self.cfg
        L.seed_everything(seed, workers=True, verbose=False)
        loader = global_batch_loader(data, batch_size, cfg.trainer.accumulate_grad_batches, seed)
        callbacks, resume = [ResumeState(loader.sampler), StopOnNonFinite(stage)], None
        checkpoints = self.store.checkpoints()
        if cfg.trainer.enable_checkpointing and checkpoints is not None:
            callbacks.append(
                ModelCheckpoint(
                    dirpath=checkpoints / stage,
                    save_last=True,
                    save_top_k=0,
                    every_n_train_steps=cfg.ckpt_every_n_steps,
                )
            )
            resume = resume_path(checkpoints / stage / "last.ckpt", cfg.ckpt_path)  # a corrupt one is set aside
            if resume:
                log.info("resuming %s from %s", stage, resume)
        training = self.training
        during = training and during_training(
            cfg, stage, training.entry, training.tokenizer, self.world, self.template, module, training.info
        )
        if during:  # chosen suites every N steps (eval/during_training.py)
            callbacks.append(during)
        logger = instantiate(cfg.logger, name=stage)
        # outside a store build nothing resumes, so no Lightning default end-of-epoch checkpoint is written either
        trainer = instantiate(
            cfg.trainer,
            **plain(cfg.strategy),
            max_epochs=epochs,
            logger=logger,
            callbacks=callbacks,
            use_distributed_sampler=False,
            enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
            default_root_dir=str(Path(cfg.paths.output_dir) / stage),
        )
        if cfg.model.get("gradient_checkpointing"):
            module.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        module.train()  # evaluation may have left it in eval mode
        trained = copy.deepcopy(module) if is_sharded(trainer.strategy) else module
        min_steps = cfg.model.get("compile_min_steps")
        steps = epochs * len(loader) // cfg.trainer.accumulate_grad_batches
        with compiled(trained.model, min_steps is not None and steps >= min_steps):
            trainer.fit(trained, train_dataloaders=loader, ckpt_path=resume, weights_only=True)
        if trained is not module:
            module.load_state_dict(full_state_dict(trainer.strategy.model))
        kept = during.finish(module) if during else {}  # keep_best: the best step's weights into `module`
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()  # one W&B run per stage
        return {k: float(v) for k, v in trainer.callback_metrics.items()} | kept

    def stage_id(self, base_id: str, method_cfg, dataset_cfg) -> str:
        """The id (`<kind>/<hash>`) `apply` gives the stage on the model of id `base_id`, found without loading or
        building anything."""
        kind = build_method(method_cfg.name).kind(method_cfg)
        return entry_id(self.store.path(kind, self.recipe(kind, base=base_id, method=method_cfg, dataset=dataset_cfg)))

    def apply(self, base: Model, method_cfg, dataset_cfg) -> Model:
        """`base` with the stage (method_cfg on dataset_cfg) applied: trained on first use, loaded from the store
        afterwards. A LoRA stage returns `base.model` with the adapter attached (`.unload()` hands it back)."""
        method = build_method(method_cfg.name)
        trained = {}
        kind, inputs = method.kind(method_cfg), {"base": base.id, "method": method_cfg, "dataset": dataset_cfg}
        entry = self.stage_id(base.id, method_cfg, dataset_cfg)

        def build(folder: Path) -> dict:
            # every random draw of the stage (adapter initialisation, masks, data order, dropout) from its seed,
            # whatever this process did before (e.g. pretrained the base or reused it from the store)
            L.seed_everything(self.cfg.seed, workers=True, verbose=False)
            outer, self.training = self.training, Training(base.tokenizer, entry, base.id, plain(method_cfg))
            try:
                trained["model"], metrics = method.train(self, base, method_cfg, dataset_cfg)
            finally:
                self.training = outer  # a stage built inside another's build (mask-DPO's task adapters)
            method.save(trained["model"], base.tokenizer, folder)
            return metrics

        folder = self.get_or_build(kind, build, **inputs)
        if not trained and enabled(self.cfg.get("eval")):
            log.info("eval.during_training: %s is reused from the store, not trained, so it has no curve", entry)
        tuned = trained["model"] if trained else method.load(base.model, folder)
        return Model(tuned, base.tokenizer, entry_id(folder))

    def base(self, align=None) -> Model:
        """The run's base: a hub/local model as it is, or the synthetic base from its recipe; then its alignment
        stage, if any, merged in: `align` ({method, dataset}), else the run's `align` (`align=False`: none)."""
        m = self.cfg.model
        where, base_id = self.base_source()
        if m.kind == ModelKind.hf:
            base = Model(
                *load_pretrained(where, m.dtype, quantization=m.quantization, allow_pickle=m.allow_pickle), base_id
            )
        else:
            base = Model(*load_pretrained(where), base_id)
        align = self.cfg.get("align") if align is None else align
        if align:
            aligned = self.apply(base, align.method, align.dataset)
            base = Model(merged(aligned.model), base.tokenizer, aligned.id)
        return base

    def base_source(self) -> tuple[str | Path, str]:
        """(where the run's base before its alignment loads from, its id) without loading it: a hub/local model's
        path, else its store entry (the synthetic base pretrained, or a GGUF file dequantised into plain safetensors,
        on first use)."""
        m = self.cfg.model
        if m.kind != ModelKind.hf:
            folder = self.get_or_build("base", self.pretrain)
        elif m.gguf_file:
            folder = dequantise_gguf(self.store, m.path, m.gguf_file)
        else:
            return m.path, str(m.path)
        return folder, entry_id(folder)

    def pretrain(self, folder: Path) -> dict:
        """Build the synthetic base into `folder`: a fresh tiny Llama trained on the world's `pretrain` view."""
        m, p = self.cfg.model, self.cfg.model.pretrain
        tokenizer = build_tokenizer(self.world)
        model = tiny_llama(
            tokenizer,
            m.hidden_size,
            m.num_layers,
            m.num_heads,
            m.intermediate_size,
            m.max_position_embeddings,
            seed=p.seed,
        )
        data_cfg = OmegaConf.create(
            {"source": "synthetic", "view": "pretrain", "n": p.n, "seed": p.seed, "args": p.args}
        )
        data = TokenizedExamples(self.examples(data_cfg), tokenizer, max_length=m.max_length)
        metrics = self.fit(
            "pretrain", SFTModule(model, lr=p.lr, warmup_ratio=p.warmup_ratio), data, p.batch_size, p.epochs, p.seed
        )
        save_pretrained(model, tokenizer, folder)
        return metrics
