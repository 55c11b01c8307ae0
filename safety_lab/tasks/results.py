"""What every task shares: evaluating a model on the run's suites, and the result contract it writes.

`Evaluation.assess` generates on every suite, judges the answers and computes the metrics (eval/), plus any
lm-evaluation-harness tasks; ranks > 0 of a multi-process run evaluate nothing. `write_results` writes a run folder's
`metrics.json` (one column unprefixed, the others as `<column>.<key>`) and `generations.jsonl`
(docs/architecture.md, "The result contract").
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from safety_lab.artifacts import write_json_atomic
from safety_lab.config import plain
from safety_lab.data.template import PromptTemplate
from safety_lab.distributed import is_rank_zero
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import evaluate, results_table
from safety_lab.eval.judges import build_judge
from safety_lab.eval.lm_eval_bridge import lm_eval_utility
from safety_lab.sources import load_suites
from safety_lab.worlds.synthetic.world import World


class Evaluation:
    """The run's suites and judge (`eval`), built and checked before any model loads."""

    def __init__(self, cfg: DictConfig, world: World, template: PromptTemplate):
        try:
            self.judge = build_judge(cfg.eval.judge, **cfg.eval.judge_args)
        except (TypeError, ValueError) as e:
            raise SafetyLabError(f"eval.judge: {e}") from e
        self.cfg, self.template = cfg, template
        self.suites = load_suites(cfg.eval, world)
        self.max_new_tokens = cfg.eval.max_new_tokens or world.spec.max_len + 2
        self.device = "cuda" if torch.cuda.is_available() else "cpu"

    def assess(self, model, tokenizer, tag: str, only: list[str] | None = None) -> tuple[dict, list[dict]]:
        """(metrics, generation rows tagged `tag`) of `model` on every suite, or on the suites named in `only`."""
        if not is_rank_zero():  # ranks > 0 train along with rank 0, nothing more
            return {}, []
        chosen = self.suites if only is None else {name: self.suites[name] for name in only}
        metrics, rows = evaluate(
            model.to(self.device),
            tokenizer,
            chosen,
            self.judge,
            self.template,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.cfg.eval.batch_size,
            generation=plain(self.cfg.eval.get("generation")),
        )
        lm_eval = self.cfg.eval.lm_eval
        if lm_eval and lm_eval.tasks and only is None:
            metrics |= lm_eval_utility(model, tokenizer, **plain(lm_eval), seed=self.cfg.seed)
        return metrics, [{"model": tag, **row} for row in rows]


def write_results(folder: Path, columns: dict, generations: list, main: str, extra: dict | None = None) -> dict:
    """metrics.json (the `main` column unprefixed, the others as `<tag>.<key>`, plus `extra`) and
    generations.jsonl in `folder`; returns the metrics."""
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


def finish(out: Path, columns: dict, generations: list, main: str) -> Path | None:
    """On rank 0: the result contract written into `out` and the results table printed; returns `out` (None on
    other ranks, which write and print nothing)."""
    if not is_rank_zero():
        return None
    write_results(out, columns, generations, main)
    print(results_table(columns))
    return out


def log_results(cfg: DictConfig, name: str, params: dict, metrics: dict) -> None:
    """Evaluation results as a logger run of their own, with the run's config (so a multirun's jobs form one W&B
    group, `logger.group`, each with its λ in the config)."""
    logger = instantiate(cfg.logger, name=name)
    logger.log_hyperparams(params)
    logger.log_metrics(metrics)
    logger.finalize("success")
    if hasattr(logger, "experiment") and hasattr(logger.experiment, "finish"):
        logger.experiment.finish()
