"""The pipeline of one run (docs/architecture.md): base model → stages → evaluation → metrics.json, nothing else.

Every trained thing comes from the artifact store by recipe (`stages.py`): the synthetic base is pretrained once, an
optional `align` stage (e.g. safety SFT) is trained once and merged into the base, and the run's own `method` on
`dataset` is trained once per (base, method, data, seed). Re-running a finished experiment only evaluates.
"""
from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from safety_lab.artifacts import write_json_atomic
from safety_lab.config import check_values, plain
from safety_lab.data.sources import load_suites
from safety_lab.distributed import is_rank_zero, job_threads
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import evaluate, results_table
from safety_lab.eval.judges import build_judge
from safety_lab.eval.lm_eval_bridge import lm_eval_utility
from safety_lab.fusion.apply import FusedModel, fusion_weights, resolve_inputs
from safety_lab.report import write_report
from safety_lab.stages import Stages, merged

log = logging.getLogger(__name__)


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
    stages = Stages(cfg)
    world = stages.world
    suites = load_suites(cfg.eval, world)
    if cfg.method.name != "none":  # fail on an unknown method before anything loads
        stages.method(cfg.method.name).check(cfg.method)
    weights = fusion_weights(cfg.fusion) if cfg.get("fusion") else []
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new_tokens = cfg.eval.max_new_tokens or world.spec.max_len + 2

    def assess(model, tokenizer, tag: str, only: list[str] | None = None):
        if not is_rank_zero():  # ranks > 0 train along with rank 0, nothing more
            return {}, []
        chosen = suites if only is None else {name: suites[name] for name in only}
        metrics, rows = evaluate(model.to(device), tokenizer, chosen, judge, stages.template,
                                 max_new_tokens=max_new_tokens, batch_size=cfg.eval.batch_size)
        if cfg.eval.lm_eval and cfg.eval.lm_eval.tasks and only is None:
            metrics |= lm_eval_utility(model, tokenizer, **plain(cfg.eval.lm_eval), seed=cfg.seed)
        return metrics, [{"model": tag, **row} for row in rows]

    base = stages.base()
    model, tokenizer = base.model, base.tokenizer
    inputs = resolve_inputs(stages, base) if weights else {}
    columns, generations = {}, []
    if cfg.get("analysis"):  # the mechanistic study trains, evaluates and analyses its own set of models
        from safety_lab.analysis.study import mechanistic_study

        columns, generations = mechanistic_study(stages, base, suites, assess, out)
    else:
        if cfg.eval.base or cfg.method.name == "none":
            columns["base"], rows = assess(model, tokenizer, "base")
            generations += rows
        if cfg.method.name != "none":
            model.cpu()
            tuned = stages.apply(base, cfg.method, cfg.dataset).model
            columns[cfg.method.name], rows = assess(tuned, tokenizer, cfg.method.name)
            generations += rows

    if not is_rank_zero():
        return None
    if not weights:
        write_results(out, columns, generations, main=cfg.method.name)
        print(results_table(columns))
        return out
    # fusion: W = W0 + merge(inputs, λ) written into the (tuned) model for each λ, never reloading it
    target = model if cfg.method.name == "none" else merged(tuned)
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
