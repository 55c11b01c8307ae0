"""The pipeline of one run (DESIGN.md §3): base model → stages → evaluation → metrics.json, and nothing else.

A *stage* is a (method, dataset) pair applied to a model. Every trained thing comes from the artifact store by
recipe: the synthetic base is pretrained once, an optional `align` stage (e.g. safety SFT) is trained once and
merged into the base, and the run's own `method` on `dataset` is trained once per (base, method, data, seed).
Re-running a finished experiment only evaluates.
"""
from __future__ import annotations

import copy
import inspect
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from safety_lab.artifacts import ArtifactStore, write_json_atomic
from safety_lab.config import ModelKind, check_values
from safety_lab.data.batching import ResumeState, global_batch_loader
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.sources import load_examples, load_suites
from safety_lab.data.template import PromptTemplate
from safety_lab.distributed import is_rank_zero, job_threads
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import evaluate, results_table
from safety_lab.eval.judges import build_judge
from safety_lab.eval.lm_eval_bridge import lm_eval_utility
from safety_lab.fusion.apply import FusedModel, fusion_weights, resolve_inputs
from safety_lab.methods import registry
from safety_lab.methods.sft import SFTModule
from safety_lab.models.factory import dequantise_gguf, load_pretrained, save_pretrained, tiny_llama
from safety_lab.models.sharding import full_state_dict, is_sharded
from safety_lab.report import write_report
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World, WorldSpec

log = logging.getLogger(__name__)
for _name in ("lightning.pytorch", "lightning.fabric"):  # their banners ("GPU available: False", tips) add nothing
    logging.getLogger(_name).setLevel(logging.WARNING)
# Model settings that do not change the synthetic base's weights (or only apply to real models).
NOT_IN_BASE_RECIPE = ("template", "gradient_checkpointing", "compile_min_steps", "quantization", "allow_pickle")
# Trainer settings that change nothing about the trained weights, so they stay out of recipes.
COSMETIC = {"log_every_n_steps", "enable_checkpointing", "enable_model_summary", "enable_progress_bar",
            "num_sanity_val_steps"}


def plain(node):
    return OmegaConf.to_container(node, resolve=True, enum_to_str=True) if node is not None else None


def training_recipe(cfg: DictConfig) -> dict:
    """What of the trainer and strategy changes trained weights: part of every training recipe."""
    trainer = {k: v for k, v in plain(cfg.trainer).items() if k not in COSMETIC}
    return {"trainer": trainer, "strategy": plain(cfg.strategy)}


def base_recipe(cfg: DictConfig) -> dict:
    """The synthetic base's store recipe: the model settings that shape its weights, the world, the training."""
    model = {k: v for k, v in plain(cfg.model).items() if k not in NOT_IN_BASE_RECIPE}
    if not model["pretrain"]["args"]:  # left out when empty, so bases made before view args existed stay valid
        del model["pretrain"]["args"]
    return {"model": model, "world": plain(cfg.world), **training_recipe(cfg)}


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
        raise SafetyLabError(f"{self.stage}: {what} is not finite at step {trainer.global_step} (last logged loss "
                             f"{float(loss) if loss is not None else 'none'}); lower the learning rate")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not torch.isfinite(loss):
            self.fail(trainer, f"the loss ({float(loss)})")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        if grads and not torch.isfinite(torch.stack(torch._foreach_norm(grads))).all():
            self.fail(trainer, "a gradient")


@dataclass
class Context:
    """What every stage needs: the config, the store, the world, the prompt template, and how to train."""

    cfg: DictConfig
    store: ArtifactStore
    world: World
    template: PromptTemplate
    methods: dict = field(default_factory=registry)
    base_id: str = ""  # the model the current stage trains on, for methods that train stages of their own
    plain = staticmethod(plain)

    @property
    def training_recipe(self) -> dict:
        return training_recipe(self.cfg)

    def examples(self, dataset_cfg) -> list:
        return load_examples(dataset_cfg, self.world)

    def fit(self, stage: str, module: L.LightningModule, data: TokenizedExamples, batch_size: int, epochs: int,
            seed: int) -> dict:
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
            callbacks.append(ModelCheckpoint(dirpath=checkpoints / stage, save_last=True, save_top_k=0,
                                             every_n_train_steps=cfg.ckpt_every_n_steps))
            from safety_lab.checkpoints import resume_path  # checked first; a corrupt last.ckpt is set aside

            resume = resume_path(checkpoints / stage / "last.ckpt", cfg.ckpt_path)
            if resume:
                log.info("resuming %s from %s", stage, resume)
        logger = instantiate(cfg.logger, name=stage)
        # outside a store build nothing resumes, so no Lightning default end-of-epoch checkpoint is written either
        trainer = instantiate(cfg.trainer, **plain(cfg.strategy), max_epochs=epochs, logger=logger,
                              callbacks=callbacks, use_distributed_sampler=False,
                              enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
                              default_root_dir=str(Path(cfg.paths.output_dir) / stage))
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
            self.base_id = base_id
            # every random draw of the stage (adapter initialisation, masks, data order, dropout) from its seed,
            # whatever this process did before (e.g. pretrained the base or reused it from the store)
            L.seed_everything(self.cfg.seed, workers=True, verbose=False)
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
        if m.gguf_file:  # dequantised once into the store, then loaded as plain safetensors
            folder = dequantise_gguf(ctx.store, m.path, m.gguf_file)
            model, tokenizer = load_pretrained(folder, m.dtype, quantization=m.quantization)
            base_id = f"dequantised/{folder.name}"
        else:
            model, tokenizer = load_pretrained(m.path, m.dtype, quantization=m.quantization,
                                               allow_pickle=m.allow_pickle)
            base_id = str(m.path)
    else:
        def pretrain(folder: Path) -> dict:
            p = m.pretrain
            tokenizer = build_tokenizer(ctx.world)
            model = tiny_llama(tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size,
                               m.max_position_embeddings, seed=p.seed)
            data_cfg = OmegaConf.create({"source": "synthetic", "view": "pretrain", "n": p.n, "seed": p.seed,
                                         "args": p.args})
            data = TokenizedExamples(ctx.examples(data_cfg), tokenizer, max_length=m.max_length)
            metrics = ctx.fit("pretrain", SFTModule(model, lr=p.lr, warmup_ratio=p.warmup_ratio), data,
                              p.batch_size, p.epochs, p.seed)
            save_pretrained(model, tokenizer, folder)
            return metrics

        folder = ctx.store.get_or_build("base", base_recipe(cfg), pretrain)
        model, tokenizer = load_pretrained(folder)
        base_id = f"base/{folder.name}"
    if cfg.get("align"):
        aligned, base_id = ctx.apply_stage(model, tokenizer, base_id, cfg.align.method, cfg.align.dataset)
        model = aligned.merge_and_unload() if hasattr(aligned, "merge_and_unload") else aligned
    return model, tokenizer, base_id


def run(cfg: DictConfig) -> Path | None:
    check_values(cfg)
    torch.set_num_threads(job_threads(cfg))
    log.info("%d intra-op threads", torch.get_num_threads())
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
    if cfg.method.name != "none":  # fail on an unknown method before anything loads
        ctx.method(cfg.method.name).check(cfg.method)
    weights = fusion_weights(cfg.fusion) if cfg.get("fusion") else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new_tokens = cfg.eval.max_new_tokens or world.spec.max_len + 2

    def assess(model, tokenizer, tag: str, only: list[str] | None = None):
        if not is_rank_zero():  # ranks > 0 train along with rank 0, nothing more
            return {}, []
        chosen = suites if only is None else {name: suites[name] for name in only}
        metrics, rows = evaluate(model.to(device), tokenizer, chosen, judge, ctx.template,
                                 max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size)
        if cfg.eval.lm_eval and cfg.eval.lm_eval.tasks and only is None:
            metrics |= lm_eval_utility(model, tokenizer, **plain(cfg.eval.lm_eval), seed=cfg.seed)
        return metrics, [{"model": tag, **row} for row in rows]

    model, tokenizer, base_id = resolve_base(ctx)
    inputs = resolve_inputs(ctx, model, tokenizer, base_id) if weights else {}
    columns, generations = {}, []
    if cfg.get("analysis"):  # the mechanistic study trains, evaluates and analyses its own set of models
        from safety_lab.analysis.study import mechanistic_study

        columns, generations = mechanistic_study(ctx, model, tokenizer, base_id, suites, assess, out)
    else:
        if cfg.eval.base or cfg.method.name == "none":
            columns["base"], rows = assess(model, tokenizer, "base")
            generations += rows
        if cfg.method.name != "none":
            tuned, _ = ctx.apply_stage(model.cpu(), tokenizer, base_id, cfg.method, cfg.dataset)
            columns[cfg.method.name], rows = assess(tuned, tokenizer, cfg.method.name)
            generations += rows

    if not is_rank_zero():
        return None
    if not weights:
        write_results(out, columns, generations, main=cfg.method.name)
        print(results_table(columns))
        return out
    # fusion: W = W0 + merge(inputs, λ) written into the (tuned) model for each λ, never reloading it
    target = model if cfg.method.name == "none" else getattr(tuned, "merge_and_unload", lambda: tuned)()
    fused, table = FusedModel(target.cpu(), inputs, cfg.fusion.merge, plain(cfg.fusion.args)), dict(columns)
    for weight in weights:
        columns["fused"], rows = assess(fused.set(weight), tokenizer, "fused")
        folder = out / f"weight={weight:g}" if cfg.fusion.weights else out
        metrics = write_results(folder, columns, generations + rows, main="fused", extra={"fusion/weight": weight})
        log_results(cfg, f"fused_{weight:g}", {**plain(cfg), "fusion": {**plain(cfg.fusion), "weight": weight}},
                    metrics)
        table[f"fused λ={weight:g}"] = columns["fused"]
    if cfg.fusion.weights:
        write_report(out)
    print(results_table(table))
    return out


def write_results(folder: Path, columns: dict, generations: list, main: str, extra: dict | None = None) -> dict:
    """metrics.json (the `main` column unprefixed, the others as `<tag>.<key>`, plus `extra`) and
    generations.jsonl in `folder` (DESIGN.md §6)."""
    folder.mkdir(parents=True, exist_ok=True)
    metrics = dict(extra or {})
    for tag, values in columns.items():
        prefix = "" if tag == main else f"{tag}."
        metrics.update({prefix + k: v for k, v in values.items()})
    write_json_atomic(folder / "metrics.json", metrics)
    tmp = folder / ".generations.jsonl.tmp"
    tmp.write_text("".join(json.dumps(row) + "\n" for row in generations))
    tmp.replace(folder / "generations.jsonl")
    return metrics


def log_results(cfg: DictConfig, name: str, params: dict, metrics: dict) -> None:
    """Evaluation results as a logger run of their own, with the run's config (so a multirun's jobs form one W&B
    group, `logger.group`, each with its λ in the config)."""
    logger = instantiate(cfg.logger, name=name)
    logger.log_hyperparams(params)
    logger.log_metrics(metrics)
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()
