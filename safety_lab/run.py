"""The pipeline of one run (DESIGN.md §3): base model → stages → evaluation → metrics.json, and nothing else.

A *stage* is a (method, dataset) pair applied to a model. Every trained thing comes from the artifact store by
recipe: the synthetic base is pretrained once, an optional `align` stage (e.g. safety SFT) is trained once and
merged into the base, and the run's own `method` on `dataset` is trained once per (base, method, data, seed).
Re-running a finished experiment only evaluates.
"""
from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from safety_lab.artifacts import ArtifactStore, write_json_atomic
from safety_lab.config import ModelKind
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.sources import load_examples, load_suites
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import evaluate, results_table
from safety_lab.eval.judges import build_judge
from safety_lab.methods import registry
from safety_lab.methods.sft import SFTModule
from safety_lab.models.factory import load_pretrained, save_pretrained, tiny_llama
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World, WorldSpec

log = logging.getLogger(__name__)
for _name in ("lightning.pytorch", "lightning.fabric"):  # their banners ("GPU available: False", tips) add nothing
    logging.getLogger(_name).setLevel(logging.WARNING)
# Trainer settings that change nothing about the trained weights, so they stay out of recipes.
COSMETIC = {"log_every_n_steps", "enable_checkpointing", "enable_model_summary", "enable_progress_bar",
            "num_sanity_val_steps"}


def plain(node):
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if node is not None else None


@dataclass
class Context:
    """What every stage needs: the config, the store, the world, the prompt template, and how to train."""

    cfg: DictConfig
    store: ArtifactStore
    world: World
    template: PromptTemplate
    methods: dict = field(default_factory=registry)
    plain = staticmethod(plain)

    @property
    def training_recipe(self) -> dict:
        trainer = {k: v for k, v in plain(self.cfg.trainer).items() if k not in COSMETIC}
        return {"trainer": trainer, "strategy": plain(self.cfg.strategy)}

    def examples(self, dataset_cfg) -> list:
        return load_examples(dataset_cfg, self.world)

    def fit(self, stage: str, module: L.LightningModule, data: TokenizedExamples, batch_size: int, epochs: int,
            seed: int) -> dict:
        """Train `module` with the configured Trainer, strategy and logger; returns the last logged metrics."""
        cfg = self.cfg
        L.seed_everything(seed, workers=True, verbose=False)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=data.collate,
                                             generator=torch.Generator().manual_seed(seed))
        logger = instantiate(cfg.logger, name=stage)
        trainer = instantiate(cfg.trainer, **plain(cfg.strategy), max_epochs=epochs, logger=logger,
                              default_root_dir=str(Path(cfg.paths.output_dir) / stage))
        module.train()  # evaluation may have left it in eval mode
        trainer.fit(module, train_dataloaders=loader)
        if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
            logger.experiment.finish()  # one W&B run per stage
        return {k: float(v) for k, v in trainer.callback_metrics.items()}

    def method(self, name: str):
        if name not in self.methods:
            raise SafetyLabError(f"method={name!r} is not one of {sorted(self.methods)}")
        return self.methods[name]

    def apply_stage(self, model, tokenizer, base_id: str, method_cfg, dataset_cfg) -> tuple[object, str]:
        """(model with the stage applied, artifact id): trained on first use, loaded from the store afterwards."""
        method = self.method(method_cfg.name)
        recipe = {"base": base_id, "method": plain(method_cfg), "dataset": plain(dataset_cfg),
                  "seed": self.cfg.seed, "template": plain(self.cfg.model.template), **self.training_recipe}
        if dataset_cfg.get("source") == "synthetic":
            recipe["world"] = plain(self.cfg.world)
        trained = {}

        def build(folder: Path) -> dict:
            trained["model"], metrics = method.train(self, model, tokenizer, method_cfg, dataset_cfg)
            method.save(trained["model"], tokenizer, folder)
            return metrics

        folder = self.store.get_or_build(method.kind(method_cfg), recipe, build)
        tuned = trained.get("model") or method.load(self, model, folder)
        return tuned, f"{folder.parent.name}/{folder.name}"


def resolve_base(ctx: Context):
    """(model, tokenizer, base id): a hub/local model as is, or the synthetic base from its store recipe; then
    the `align` stage, if any, merged in."""
    cfg, m = ctx.cfg, ctx.cfg.model
    if m.kind == ModelKind.hf:
        model, tokenizer = load_pretrained(m.path, m.dtype, m.gguf_file)
        base_id = str(m.path)
    else:
        recipe = {"model": {k: v for k, v in plain(m).items() if k != "template"}, "world": plain(cfg.world),
                  **ctx.training_recipe}

        def pretrain(folder: Path) -> dict:
            p = m.pretrain
            tokenizer = build_tokenizer(ctx.world)
            model = tiny_llama(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                               m.max_position_embeddings, seed=p.seed)
            data_cfg = OmegaConf.create({"source": "synthetic", "view": "pretrain", "n": p.n, "seed": p.seed,
                                         "args": {}})
            data = TokenizedExamples(ctx.examples(data_cfg), tokenizer, max_length=m.max_length)
            metrics = ctx.fit("pretrain", SFTModule(model, lr=p.lr, warmup_ratio=p.warmup_ratio), data,
                              p.batch_size, p.epochs, p.seed)
            save_pretrained(model, tokenizer, folder)
            return metrics

        folder = ctx.store.get_or_build("base", recipe, pretrain)
        model, tokenizer = load_pretrained(folder)
        base_id = f"base/{folder.name}"
    if cfg.get("align"):
        aligned, base_id = ctx.apply_stage(model, tokenizer, base_id, cfg.align.method, cfg.align.dataset)
        model = aligned.merge_and_unload() if hasattr(aligned, "merge_and_unload") else aligned
    return model, tokenizer, base_id


def run(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:  # bad settings fail before any model loads
        judge = build_judge(cfg.eval.judge, **cfg.eval.judge_args)
    except (TypeError, ValueError) as e:
        raise SafetyLabError(f"eval.judge: {e}") from e
    try:
        inspect.signature(get_class(cfg.trainer._target_)).bind(
            **{k: v for k, v in cfg.trainer.items() if k != "_target_"}, **cfg.strategy)
    except TypeError as e:
        raise SafetyLabError(f"trainer / strategy: {e} (of {cfg.trainer._target_})") from e
    world = World(WorldSpec(**plain(cfg.world)))
    suites = load_suites(cfg.eval, world)
    ctx = Context(cfg, ArtifactStore(cfg.paths.artifacts), world, PromptTemplate(**plain(cfg.model.template)))
    ctx.method(cfg.method.name)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new_tokens = cfg.eval.max_new_tokens or world.spec.max_len + 2

    def assess(model, tokenizer, tag: str):
        metrics, rows = evaluate(model.to(device), tokenizer, suites, judge, ctx.template,
                                 max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size)
        return metrics, [{"model": tag, **row} for row in rows]

    model, tokenizer, base_id = resolve_base(ctx)
    columns, generations = {}, []
    if cfg.eval.base or cfg.method.name == "none":
        columns["base"], rows = assess(model, tokenizer, "base")
        generations += rows
    if cfg.method.name != "none":
        tuned, _ = ctx.apply_stage(model.cpu(), tokenizer, base_id, cfg.method, cfg.dataset)
        columns[cfg.method.name], rows = assess(tuned, tokenizer, cfg.method.name)
        generations += rows

    metrics = {}
    for tag, values in columns.items():
        prefix = "" if tag == cfg.method.name else f"{tag}."
        metrics.update({prefix + k: v for k, v in values.items()})
    write_json_atomic(out / "metrics.json", metrics)
    tmp = out / ".generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in generations))
    tmp.replace(out / "generations.jsonl")
    print(results_table(columns))
    return out
