"""Evaluation during training (eval/during_training.py, python -m safety_lab.evaluate_checkpoints).

The rates logged every N steps are the final evaluation's metrics of the weights at that step (checked against a
separate evaluation of the saved weights, on a tiny model whose answers change as it trains); their hits and counts
add up over shards of the prompts as under DDP/FSDP; training is bit-identical with and without the evaluation, even
with a judge that draws random numbers and LoRA dropout that consumes them; keep_best publishes the best step and
enters the recipe only when set; bad settings are one line, exit 2.
"""

from __future__ import annotations

import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SENTENCES, build_tiny_llama, build_tiny_tokenizer
from helpers import REPO, fit_config, run_safety_lab
from omegaconf import OmegaConf
from test_recipes import base_id, composed, stage_id

from safety_lab.config import check_values
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.records import Example, Probe
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.eval.during_training import (
    SuiteTotals,
    check_settings,
    metrics_from_totals,
    statistic_keys,
    statistics,
)
from safety_lab.eval.evaluate import evaluate
from safety_lab.eval.judges import JUDGES, Judgement, KeywordJudge
from safety_lab.eval.metrics import PREFERENCE_LABELS, suite_metrics
from safety_lab.methods.sft import SFTModule
from safety_lab.models.lora import trainable
from safety_lab.sources import load_suites
from safety_lab.stages import Stages, Training

LORA = {"r": 4, "alpha": 8.0, "dropout": 0.1, "target_modules": "all-linear"}  # dropout: training draws random numbers
KEYWORDS = ["a", "s"]  # what the tiny model says at step 3 often contains them; by step 6 it says almost nothing


class RandomDrawingJudge(KeywordJudge):
    """The keyword judge, drawing from every RNG as it judges: were the RNG states not restored after an evaluation,
    the dropout masks of the following training steps would change."""

    name = "test_random_drawing"

    def judge(self, probes, responses):
        random.random(), np.random.rand(), torch.rand(3)
        return super().judge(probes, responses)


@pytest.fixture(autouse=True)
def random_drawing_judge(monkeypatch):
    """Registered for this module's tests only, so other modules see the registry as shipped."""
    monkeypatch.setitem(JUDGES, RandomDrawingJudge.name, RandomDrawingJudge)


# ---- metrics from hits and counts, summed over shards (pure) -------------------------------------------------------
def probe(i: int, unsafe: bool) -> Probe:
    return Probe(f"p{i}", unsafe, target=None)


@pytest.mark.parametrize("labels", [(), ("unsafe", "safe"), PREFERENCE_LABELS])
@pytest.mark.parametrize("shards", [1, 2, 3])
def test_hits_and_counts_summed_over_shards_give_the_final_evaluations_metrics(labels, shards):
    rng = random.Random(len(labels) * 10 + shards)
    probes = [probe(i, i % 3 == 0) for i in range(17)]
    judgements = [
        Judgement(
            rng.choice([True, False, None]),
            rng.choice([True, False, None]),
            rng.choice([None, 1.0, 3.0, 5.0]),
            rng.choice([None, *labels]) if labels else None,
        )
        for _ in probes
    ]
    suites = {"mixed": probes, "empty": [], "safe_only": probes[1:3]}
    verdicts = {"mixed": judgements, "empty": [], "safe_only": judgements[1:3]}
    keys = statistic_keys(suites, labels)
    totals = SuiteTotals(len(keys))
    for rank in range(shards):  # what each rank adds; torchmetrics sums the ranks' totals
        shard = torch.zeros(len(keys), 2, dtype=torch.float64)
        for name, members in suites.items():
            mine = [i for i in range(len(members)) if i % shards == rank]
            stats = statistics([members[i] for i in mine], [verdicts[name][i] for i in mine], labels)
            for k, key in enumerate(keys):
                if key[0] == name:
                    shard[k] += torch.tensor(stats[key[1]], dtype=torch.float64)
        totals.update(shard)
    summed = {key: tuple(t.tolist()) for key, t in zip(keys, totals.compute())}
    expected = {}
    for name in suites:
        expected |= suite_metrics(name, suites[name], verdicts[name], labels)
    assert metrics_from_totals(summed, labels) == expected


# ---- settings -------------------------------------------------------------------------------------------------------
def eval_config(**during) -> OmegaConf:
    return OmegaConf.create(
        {
            "suites": {"harmful": {}, "utility": {}},
            "during_training": {
                "every_n_steps": 5,
                "suites": None,
                "n": None,
                "save_checkpoints": False,
                "keep_best": {"metric": None, "mode": "max"},
                **during,
            },
        }
    )


@pytest.mark.parametrize(
    "during, message",
    [
        ({"suites": ["harmful", "nope"]}, "eval.during_training.suites: 'nope' is not one of the run's suites"),
        ({"suites": []}, "eval.during_training.suites is empty"),
        ({"keep_best": {"metric": "nope/refusal_rate"}}, "eval.during_training.keep_best.metric='nope/refusal_rate'"),
        ({"keep_best": {"metric": "harmful/nope"}}, "is not <suite>/<metric>"),
        ({"every_n_steps": None, "keep_best": {"metric": "harmful/refusal_rate"}}, "needs eval.during_training.every"),
        ({"every_n_steps": None, "save_checkpoints": True}, "save_checkpoints needs eval.during_training.every"),
    ],
)
def test_settings_that_cannot_work_are_one_line(during, message):
    with pytest.raises(SafetyLabError) as info:
        check_settings(eval_config(**during), ("unsafe",))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_settings_that_work():
    check_settings(eval_config(keep_best={"metric": "utility/unsafe_rate", "mode": "min"}), ("unsafe",))
    check_settings(eval_config(every_n_steps=None))


def test_keep_best_enters_the_stage_recipe_only_when_set(tmp_path):
    plain = composed(tmp_path, "+experiment=quickstart", "eval.during_training.every_n_steps=25")
    assert stage_id(plain, base_id(plain), plain.cfg) == "adapter/6d888c94da0beff3"  # test_recipes' pinned hash
    best = composed(
        tmp_path,
        "+experiment=quickstart",
        "eval.during_training.every_n_steps=25",
        "eval.during_training.keep_best.metric=harmful/refusal_rate",
    )
    assert base_id(best) == "base/8c32b02c218649fd"  # the base is not a stage: never evaluated during training
    assert stage_id(best, base_id(best), best.cfg) != "adapter/6d888c94da0beff3"
    recipe = best.recipe("adapter", base=base_id(best), method=best.cfg.method, dataset=best.cfg.dataset)
    assert recipe["keep_best"]["metric"] == "harmful/refusal_rate" and recipe["keep_best"]["every_n_steps"] == 25
    assert recipe["keep_best"]["suites"]["harmful"]["n"] == 200


# ---- in-process fits of a tiny model --------------------------------------------------------------------------------
def fit(tmp_path: Path, every: int | None, keep_best: str | None = None, save: bool = True):
    """A LoRA (with dropout) on the tiny Llama, 2 epochs of 4 steps, with evaluation every `every` steps on a
    12-prompt file suite judged by keywords; returns (the trained model, the tokenizer, the config)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    suite = tmp_path / "suite.jsonl"
    suite.write_text(
        "".join(json.dumps({"prompt": s, "unsafe": i % 2 == 1}) + "\n" for i, s in enumerate(SENTENCES[:12]))
    )
    tokenizer = build_tiny_tokenizer()
    data = TokenizedExamples(
        [Example(SENTENCES[i], SENTENCES[i + 1]) for i in range(0, 32, 2)], tokenizer, max_length=64
    )
    cfg = OmegaConf.create(
        fit_config(
            tmp_path,
            model={"compile_min_steps": None, "template": {}},
            world={},
            eval={
                "judge": RandomDrawingJudge.name,
                "judge_args": {"keywords": KEYWORDS},
                "n": 12,
                "batch_size": 5,
                "max_new_tokens": 6,
                "suites": {"mixed": {"source": "file", "path": str(suite), "unsafe_key": "unsafe"}},
                "during_training": {
                    "every_n_steps": every,
                    "suites": None,
                    "n": None,
                    "save_checkpoints": save and every is not None,
                    "keep_best": {"metric": keep_best, "mode": "max"},
                },
            },
        )
    )
    stages = Stages(cfg)
    stages.training = Training(tokenizer, "adapter/0123456789abcdef", "base/tiny", {"name": "sft", "lora": LORA})
    model = trainable(build_tiny_llama(len(tokenizer)), LORA)
    metrics = stages.fit("sft", SFTModule(model, lr=3e-2, warmup_ratio=0.0), data, 4, 2, seed=0)
    return model, tokenizer, cfg, metrics


def curve(folder: Path) -> list[dict]:
    with (folder / "training_curves.csv").open() as f:
        return list(csv.DictReader(f))


def separate_evaluation(checkpoint: Path, tokenizer, cfg) -> tuple[dict, list[dict]]:
    """The final evaluation's metrics and rows of a fresh model holding the checkpoint's weights."""
    model = trainable(build_tiny_llama(len(tokenizer)), LORA)
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    missing, unexpected = model.load_state_dict({k.removeprefix("model."): v for k, v in state.items()}, strict=False)
    assert not unexpected and not [k for k in missing if "lora_" in k]
    suites = load_suites(cfg.eval, None)
    return evaluate(model, tokenizer, suites, KeywordJudge(KEYWORDS), PromptTemplate(), 6, 5, progress=False)


def test_logged_rates_equal_a_separate_evaluation_of_the_weights_at_that_step(tmp_path):
    _, tokenizer, cfg, _ = fit(tmp_path, every=3)
    rows = curve(tmp_path)
    assert [int(r["step"]) for r in rows] == [3, 6, 8]  # one row per interval: 8 steps, every 3, the last one shorter
    checkpoints = sorted((tmp_path / "checkpoints").glob("sft-adapter-0123456789abcdef/step=*.ckpt"))
    assert [c.name for c in checkpoints] == ["step=000003.ckpt", "step=000006.ckpt", "step=000008.ckpt"]
    refusals = []
    for row, checkpoint in zip(rows, checkpoints):
        metrics, generations = separate_evaluation(checkpoint, tokenizer, cfg)
        assert {k: float(row[k]) for k in metrics} == metrics
        # by hand: the share of the 12 answers with an "a" or an "s" in them
        refused = sum(any(k in g["response"].lower() for k in KEYWORDS) for g in generations)
        assert float(row["mixed/refusal_rate"]) == refused / 12
        refusals.append(refused)
    assert len(set(refusals)) > 1, refusals  # the answers change as it trains: the check is not of constants
    logged = list(csv.DictReader((tmp_path / "sft" / "version_0" / "metrics.csv").open()))
    logged = {int(r["step"]): r for r in logged if r.get("eval/mixed/refusal_rate")}
    assert {step: float(r["eval/mixed/refusal_rate"]) for step, r in logged.items()} == {
        int(r["step"]): float(r["mixed/refusal_rate"]) for r in rows
    }
    assert (tmp_path / "training_curves.png").stat().st_size > 10_000


def test_training_is_bit_identical_with_and_without_evaluation(tmp_path):
    without, *_ = fit(tmp_path / "without", every=None)
    with_eval, *_ = fit(tmp_path / "with", every=1)
    assert len(curve(tmp_path / "with")) == 8
    assert not (tmp_path / "without" / "training_curves.csv").exists()
    different = [n for (n, a), b in zip(without.named_parameters(), with_eval.parameters()) if not torch.equal(a, b)]
    assert not different, different[:3]


def test_keep_best_puts_the_best_steps_weights_into_the_model(tmp_path):
    model, _, _, metrics = fit(tmp_path, every=1, keep_best="mixed/refusal_rate")
    rows = curve(tmp_path)
    values = [float(r["mixed/refusal_rate"]) for r in rows]
    best = int(rows[values.index(max(values))]["step"])  # the earliest of equally good steps
    assert best != 8, values  # not the last step: the test would not tell keeping from not keeping
    assert metrics["best/step"] == best and metrics["best/mixed/refusal_rate"] == max(values)
    state = torch.load(tmp_path / "checkpoints" / "sft-adapter-0123456789abcdef" / f"step={best:06d}.ckpt")
    weights = dict(model.named_parameters())
    assert all(torch.equal(weights[k.removeprefix("model.")], v) for k, v in state["state_dict"].items())


# ---- the command line ---------------------------------------------------------------------------------------------
FAST = ("+experiment=quickstart", "+debug=fast", "dataset.n=128")  # 4 optimiser steps of the safety adapter


def evaluate_checkpoints(*args: str, store: Path):
    env = {**os.environ, "SAFETY_LAB_STORE": str(store), "WANDB_SILENT": "true"}
    command = [sys.executable, "-m", "safety_lab.evaluate_checkpoints", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_quickstart_on_wandb_offline_then_every_checkpoint_evaluated(tmp_path):
    run = tmp_path / "run"
    result = run_safety_lab(
        *FAST,
        "eval.during_training.every_n_steps=1",
        "eval.during_training.save_checkpoints=true",
        "logger=wandb",
        f"hydra.run.dir={run}",
        store=tmp_path / "store",
        env={"WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = curve(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert (run / "training_curves.png").exists()
    logged = [f.read_bytes() for f in run.rglob("wandb/offline-run-*/run-*.wandb")]
    # one W&B run per stage: the base's pretraining (not evaluated during training) and the adapter's, with the curve
    assert sorted(b"eval/harmful/refusal_rate" in run for run in logged) == [False, True]

    result = evaluate_checkpoints(str(run), store=tmp_path / "store")
    assert result.returncode == 0, result.stderr[-3000:]
    out = Path(result.stdout.strip().splitlines()[-1])
    assert out == run / "checkpoint_evaluation"
    with (out / "checkpoints.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [int(r["step"]) for r in table] == [1, 2, 3, 4]
    metric_keys = [k for k in rows[0] if "/" in k and k not in ("entry",)]
    for logged_row, evaluated in zip(rows, table):
        assert {k: float(logged_row[k]) for k in metric_keys} == {k: float(evaluated[k]) for k in metric_keys}
    assert (out / "checkpoints.png").exists() and "| step=000004.ckpt | 4 |" in (out / "checkpoints.md").read_text()


def error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(lines) == 1, result.stderr[-2000:]
    return lines[0]


def test_an_interval_below_one_is_out_of_range():
    for steps in (0, -5):
        with pytest.raises(SafetyLabError, match=f"^eval.during_training.every_n_steps={steps}: must be >= 1$"):
            check_values(OmegaConf.create({"eval": {"during_training": {"every_n_steps": steps}}}))


@pytest.mark.parametrize(
    "override, message",
    [
        ("eval.during_training.every_n_steps=0", "error: eval.during_training.every_n_steps=0: must be >= 1"),
        ("eval.during_training.suites=[harmful,nope]", "error: eval.during_training.suites: 'nope' is not one of"),
    ],
)
def test_bad_settings_stop_the_run_before_anything_loads(override, message, tmp_path):
    result = run_safety_lab(*FAST, override, store=tmp_path / "store")
    assert error_line(result).startswith(message)
    assert not (tmp_path / "store" / "base").exists()


def test_evaluate_checkpoints_needs_a_folder_with_checkpoints(tmp_path):
    (tmp_path / "empty").mkdir()
    assert error_line(evaluate_checkpoints(str(tmp_path / "empty"), store=tmp_path / "store")) == (
        f"error: no checkpoints (*.ckpt) under {tmp_path / 'empty'}"
    )
    missing = error_line(evaluate_checkpoints(str(tmp_path / "nope"), store=tmp_path / "store"))
    assert missing.startswith(f"error: {tmp_path / 'nope'} does not exist")
    assert error_line(evaluate_checkpoints(store=tmp_path / "store")).startswith("error: which folder?")


def test_evaluate_checkpoints_refuses_an_unknown_suite(tmp_path):
    folder = tmp_path / "ckpts"
    folder.mkdir()
    torch.save({"state_dict": {}, "global_step": 1}, folder / "step=000001.ckpt")
    result = evaluate_checkpoints(
        str(folder), "+experiment=quickstart", "eval.during_training.suites=[nope]", store=tmp_path / "store"
    )
    assert error_line(result).startswith("error: eval.during_training.suites: 'nope' is not one of the run's suites")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_rates_under_ddp_and_fsdp_are_those_of_the_whole_suites(strategy, tmp_path):
    """Two CPU processes, each judging half of the prompts: the summed curve equals one process's evaluation of the
    saved weights (gathered from the shards under FSDP)."""
    run = tmp_path / "run"
    result = run_safety_lab(
        *FAST,
        f"strategy={strategy}",
        "method.batch_size=16",  # per process: global batches of 32, 4 steps
        "eval.n=9",  # odd: the ranks judge 5 and 4 prompts of each suite
        "eval.during_training.every_n_steps=1",
        "eval.during_training.save_checkpoints=true",
        f"hydra.run.dir={run}",
        store=tmp_path / "store",
        root=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = curve(run)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and rows[0]["harmful/n"] == "9"
    result = evaluate_checkpoints(str(run), store=tmp_path / "store")
    assert result.returncode == 0, result.stderr[-3000:]
    with (run / "checkpoint_evaluation" / "checkpoints.csv").open() as f:
        table = list(csv.DictReader(f))
    keys = [k for k in rows[0] if "/" in k and k != "entry"]
    assert [{k: float(r[k]) for k in keys} for r in rows] == [{k: float(r[k]) for k in keys} for r in table]


@pytest.mark.slow
def test_a_killed_fit_resumes_its_curve_and_its_best_step(tmp_path):
    """SIGKILL while the adapter trains (checkpoints every step), then the same command: the curve of the resumed
    run has every evaluation, the ones before the kill restored from the checkpoint, and the best step is chosen
    among all of them."""
    import glob
    import signal
    import time

    args = (
        "+experiment=quickstart",
        "+debug=fast",
        "dataset.n=1024",  # 32 steps
        "ckpt_every_n_steps=1",
        "trainer.enable_checkpointing=true",
        "eval.during_training.every_n_steps=2",
        "eval.during_training.keep_best.metric=harmful/refusal_rate",
    )
    store = tmp_path / "store"
    process = run_safety_lab(*args, f"hydra.run.dir={tmp_path}/first", store=store, popen=True)
    while not glob.glob(f"{store}/adapter/.ckpt-*/sft/last.ckpt"):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.02)
    time.sleep(1.0)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = [int(r["step"]) for r in curve(tmp_path / "first")]
    assert first and first[-1] < 32
    result = run_safety_lab(*args, f"hydra.run.dir={tmp_path}/second", store=store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resuming sft from" in result.stderr and "sft: keeping step" in result.stderr
    assert [int(r["step"]) for r in curve(tmp_path / "second")] == list(range(2, 33, 2))
