"""The pipeline of one run (DESIGN.md §3): base model → method → evaluation → metrics.json, and nothing else.

Every trained thing comes from the artifact store by recipe: the synthetic base is pretrained once and the method's
adapter is trained once per (base, method, data, seed); re-running a finished experiment only evaluates.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from safety_lab.artifacts import ArtifactStore, write_json_atomic
from safety_lab.config import ModelKind, Source
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.sources import load_examples, load_suites
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import evaluate, results_table
from safety_lab.eval.judges import build_judge
from safety_lab.methods.sft import SFTModule
from safety_lab.models.factory import load_pretrained, save_pretrained, tiny_llama
from safety_lab.models.lora import attach_lora, load_adapter, save_adapter
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World, WorldSpec

log = logging.getLogger(__name__)
for _name in ("lightning.pytorch", "lightning.fabric"):  # their banners ("GPU available: False", tips) add nothing
    logging.getLogger(_name).setLevel(logging.WARNING)
# Trainer settings that change nothing about the trained weights, so they stay out of recipes.
COSMETIC = {"log_every_n_steps", "enable_checkpointing", "enable_model_summary", "enable_progress_bar",
            "num_sanity_val_steps"}


def plain(node) -> dict:
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True)


def training_recipe(cfg: DictConfig) -> dict:
    trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in COSMETIC}
    return {"trainer": trainer, "strategy": plain(cfg.strategy)}


def fit(cfg: DictConfig, stage: str, module: L.LightningModule, data: TokenizedExamples, batch_size: int,
        epochs: int, seed: int) -> dict:
    """Train `module` with the configured Trainer, strategy and logger; returns the last logged metrics."""
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


def resolve_base(cfg: DictConfig, store: ArtifactStore, world: World):
    """(model, tokenizer, base id): a hub/local model as is, or the synthetic base from its store recipe."""
    m = cfg.model
    if m.kind == ModelKind.hf:
        model, tokenizer = load_pretrained(m.path, m.dtype, m.gguf_file)
        return model, tokenizer, str(m.path)
    recipe = {"model": plain(m), "world": plain(cfg.world), **training_recipe(cfg)}
    recipe["model"].pop("template")

    def pretrain(folder: Path) -> dict:
        p = m.pretrain
        tokenizer = build_tokenizer(world)
        model = tiny_llama(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                           m.max_position_embeddings, seed=p.seed)
        data = TokenizedExamples(load_examples(OmegaConf.create({"source": Source.synthetic, "view": "pretrain",
                                                                 "n": p.n, "seed": p.seed, "args": {}}), world),
                                 tokenizer, max_length=m.max_length)
        module = SFTModule(model, lr=p.lr, warmup_ratio=p.warmup_ratio)
        metrics = fit(cfg, "pretrain", module, data, p.batch_size, p.epochs, p.seed)
        save_pretrained(model, tokenizer, folder)
        return metrics

    folder = store.get_or_build("base", recipe, pretrain)
    model, tokenizer = load_pretrained(folder)
    return model, tokenizer, folder.name


def train_method(cfg: DictConfig, store: ArtifactStore, world: World, model, tokenizer, base_id: str,
                 template: PromptTemplate):
    """The base with the method applied: trained on first use, loaded from the store afterwards."""
    method = cfg.method
    if method.name == "none":
        return model
    if method.name != "sft":
        raise SafetyLabError(f"method={method.name!r} is not available yet (choose sft or none)")
    recipe = {"base": base_id, "method": plain(method), "dataset": plain(cfg.dataset), "seed": cfg.seed,
              "template": plain(cfg.model.template), **training_recipe(cfg)}
    if cfg.dataset.source == Source.synthetic:
        recipe["world"] = plain(cfg.world)
    kind = "adapter" if method.lora else "model"
    trained = {}

    def build(folder: Path) -> dict:
        examples = load_examples(cfg.dataset, world)
        tuned = attach_lora(model, **plain(method.lora)) if method.lora else model
        data = TokenizedExamples(examples, tokenizer, template, cfg.model.max_length, method.train_on_prompt)
        module = SFTModule(tuned, lr=method.lr, weight_decay=method.weight_decay, warmup_ratio=method.warmup_ratio,
                           min_lr_ratio=method.min_lr_ratio)
        metrics = fit(cfg, method.name, module, data, method.batch_size, method.epochs, cfg.seed)
        (save_adapter(tuned, folder) if method.lora else save_pretrained(tuned, tokenizer, folder))
        trained["model"] = tuned
        return metrics

    folder = store.get_or_build(kind, recipe, build)
    if "model" in trained:
        return trained["model"]
    return load_adapter(model, folder) if method.lora else load_pretrained(folder)[0]


def run(cfg: DictConfig) -> Path:
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = build_judge(cfg.eval.judge, **cfg.eval.judge_args)  # a bad judge fails before any model loads
    world = World(WorldSpec(**plain(cfg.world)))
    suites = load_suites(cfg.eval, world)
    template = PromptTemplate(**plain(cfg.model.template))
    store = ArtifactStore(cfg.paths.artifacts)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new_tokens = cfg.eval.max_new_tokens or world.spec.max_len + 2

    def assess(model, tokenizer, tag: str):
        metrics, rows = evaluate(model.to(device), tokenizer, suites, judge, template,
                                 max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size)
        return metrics, [{"model": tag, **row} for row in rows]

    model, tokenizer, base_id = resolve_base(cfg, store, world)
    columns, generations = {}, []
    if cfg.eval.base or cfg.method.name == "none":
        columns["base"], rows = assess(model, tokenizer, "base")
        generations += rows
    if cfg.method.name != "none":
        tuned = train_method(cfg, store, world, model.cpu(), tokenizer, base_id, template)
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
