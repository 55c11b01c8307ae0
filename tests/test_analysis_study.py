"""The mechanistic study: its findings logic on constructed numbers, the analyses on a tiny random synthetic Llama,
and a smoke run of the whole experiment."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from safety_lab.analysis.study import ANALYSES, Study, check_analysis, findings
from safety_lab.config import AnalysisConfig
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.eval.evaluate import evaluate
from safety_lab.eval.judges import build_judge
from safety_lab.models.factory import tiny_llama
from safety_lab.stages import Model
from safety_lab.tasks.analyse import analyse
from safety_lab.worlds.synthetic import views
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World, WorldSpec

REPO = Path(__file__).resolve().parents[1]


def _space(silhouette: float, relative: dict[str, float]) -> dict:
    layer = {"silhouette": silhouette, "suites": {s: {"relative_l2": v} for s, v in relative.items()}}
    return {"layers": [layer, layer], "silhouette_mean": silhouette}


def test_findings_state_each_claim_as_a_check_on_the_numbers():
    cfg = OmegaConf.create(
        {
            "unsafe_suite": "harmful",
            "jailbreak_suites": ["jb"],
            "models": {
                "sft_a": {"method": {"name": "sft", "lr": 1e-3}},
                "sft_b": {"method": {"name": "sft", "lr": 1e-4}},
            },
        }
    )
    results = {
        "activation_space": {
            "base": _space(0.1, {"harmful": 0.5, "jb": 0.5}),
            "sft_a": _space(0.4, {"harmful": 0.6, "jb": 0.45}),
            "sft_b": _space(0.05, {"harmful": 0.5, "jb": 0.55}),
        },
        "row_space": {"sft_a": {"unsafe_over_safe": 1.8}, "sft_b": {"unsafe_over_safe": 0.9}},
        "column_space": {
            "sft_a": {"mean_sine": 0.3, "relative_change": 0.2},
            "sft_b": {"mean_sine": 0.1, "relative_change": 0.05},
        },
        "jailbreak": {"base": {"jb": 1.0}, "sft_a": {"jb": 0.2}, "sft_b": {"jb": 0.6}},
    }
    checks = findings(results, cfg)
    assert checks["silhouette_up"]["sft_a"]["holds"] and not checks["silhouette_up"]["sft_b"]["holds"]
    assert checks["jailbreaks_closer_to_safe"]["sft_a"]["jb"]["holds"]
    assert not checks["jailbreaks_closer_to_safe"]["sft_b"]["jb"]["holds"]
    row = checks["row_space_carries_unsafe"]
    assert row["sft_a"]["holds"] and not row["sft_b"]["holds"]
    lr = checks["smaller_lr"]["sft"]
    assert lr["models"] == {"low": "sft_b", "high": "sft_a"}
    assert lr["changes_weights_less_holds"] and lr["easier_to_jailbreak_holds"]
    assert lr["jailbreak_compliance"] == {"low": 0.6, "high": 0.2}
    # the attack's success after its last step, averaged over the numbers of soft tokens
    results["soft_tokens"] = {
        t: {"1": {"success": {"0": 0.0, "9": s1}}, "2": {"success": {"0": 0.0, "9": s2}}}
        for t, (s1, s2) in {"sft_a": (0.25, 0.5), "sft_b": (1.0, 0.5)}.items()
    }
    lr = findings(results, cfg)["smaller_lr"]["sft"]
    assert lr["soft_token_success"] == {"low": 0.75, "high": 0.375} and lr["easier_to_attack_holds"]
    # a check whose analysis did not run is left out
    partial = findings({"jailbreak": results["jailbreak"], "row_space": results["row_space"]}, cfg)
    assert set(partial) == {"row_space_carries_unsafe"}


def build_synthetic():
    """(world, tokenizer, a tiny random 2-layer Llama, 12-prompt utility / harmful / jailbreak_competing suites)."""
    world = World(WorldSpec())
    tokenizer = build_tokenizer(world)
    model = tiny_llama(
        tokenizer, hidden_size=24, num_layers=2, num_heads=2, intermediate_size=48, max_position_embeddings=64
    ).eval()
    suites = {name: views.suite(world, name, 12) for name in ("utility", "harmful", "jailbreak_competing")}
    return world, tokenizer, model, suites


@pytest.fixture(scope="module")
def synthetic():
    return build_synthetic()


def _analysis(**analysis):
    return OmegaConf.merge(
        OmegaConf.structured(AnalysisConfig),
        {"jailbreak_suites": ["jailbreak_competing"], "lipschitz_n": 4, **analysis},
    )


def _study(synthetic, tmp_path, **analysis):
    _, tokenizer, _, suites = synthetic
    return Study(_analysis(**analysis), PromptTemplate(), tokenizer, suites, tmp_path)


def _assess(synthetic):
    _, tokenizer, _, suites = synthetic
    judge = build_judge("exact")

    def assess(model, tag, only=None):
        chosen = suites if only is None else {name: suites[name] for name in only}
        metrics, rows = evaluate(model, tokenizer, chosen, judge, max_new_tokens=4, progress=False)
        return metrics, [{"model": tag, **row} for row in rows]

    return assess


def test_study_writes_each_chosen_analysis_and_compares_tuned_weights_with_the_base(synthetic, tmp_path):
    _, _, model, _ = synthetic
    tuned = copy.deepcopy(model)
    with torch.no_grad():
        tuned.model.layers[0].mlp.up_proj.weight.mul_(2.0)  # ΔW = W_pre in that matrix, zero elsewhere
    study = _study(
        synthetic,
        tmp_path,
        attack={"n": 3, "tokens": [1, 2], "steps": 2, "report_at": [1]},
        models={"tuned": {"method": {"name": "sft", "lr": 1e-3}}},
    )
    columns, rows = study.run({"base": model, "tuned": tuned}, _assess(synthetic))
    assert set(columns) == {"base", "tuned"} and len(rows) == 2 * (36 + 12 + 12)  # with the steered generations
    assert list(ANALYSES) == [
        "activation_space",
        "column_space",
        "row_space",
        "lipschitz",
        "soft_tokens",
        "refusal_direction",
    ]
    for name in (*ANALYSES, "jailbreak"):  # analysis.analyses null: every registered analysis
        assert (tmp_path / f"{name}.json").exists() and (tmp_path / f"{name}.png").exists(), name
    row = json.loads((tmp_path / "row_space.json").read_text())["tuned"]["matrices"]
    assert row["layer0.up_proj"]["safe"][0] > 0 and max(row["layer1.gate_proj"]["safe"]) == 0  # ΔW = 0 there
    column = json.loads((tmp_path / "column_space.json").read_text())["tuned"]["matrices"]
    assert column["layer0.up_proj"]["relative_change"] == pytest.approx(1.0)  # ‖2W − W‖ / ‖W‖
    assert max(column["layer0.up_proj"]["sines"]) < 1e-3  # scaling a matrix keeps its column space
    soft = json.loads((tmp_path / "soft_tokens.json").read_text())
    assert set(soft["base"]) == {"1", "2"} and list(soft["base"]["1"]["success"]) == ["0", "1", "2"]
    refusal = json.loads((tmp_path / "refusal_direction.json").read_text())["base"]
    # every prompt ends in "=": no direction at layer 0; layer 1 is chosen though it is in the last 20%
    assert refusal["layers"][0] == {"norm": 0.0, "ablated_unsafe": None, "added_safe": None}
    assert refusal["selected_layer"] == 1 and "harmful/refusal_rate" in refusal["ablated_generation"]
    checks = json.loads((tmp_path / "findings.json").read_text())
    assert set(checks) == {
        "silhouette_up",
        "jailbreaks_closer_to_safe",
        "row_space_carries_unsafe",
        "ablation_raises_compliance",
        "addition_raises_refusal",
        "smaller_lr",
    }
    assert checks["smaller_lr"] == {}  # one learning rate per method: nothing to compare


def test_study_runs_only_the_chosen_analyses_and_rejects_unknown_ones(synthetic, tmp_path):
    _, _, model, suites = synthetic
    study = _study(synthetic, tmp_path, analyses=["activation_space"])
    recorded = []  # the projections whose inputs are recorded: the row space's, not run here
    study.activations = lambda model, prompts, inputs: (
        recorded.append(inputs) or Study.activations(study, model, prompts)
    )
    study.run({"base": model}, _assess(synthetic))
    assert recorded == [()]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "activation_space.json",
        "activation_space.png",
        "activation_space_pca.png",
        "findings.json",
        "jailbreak.json",
        "jailbreak.png",
    ]
    with pytest.raises(SafetyLabError, match="analysis.analyses: 'probes' is not one of"):
        check_analysis(_analysis(analyses=["probes"]), suites)


def test_ranks_above_zero_leave_the_analyses_to_rank_zero(synthetic, tmp_path, monkeypatch):
    _, tokenizer, model, suites = synthetic
    monkeypatch.setenv("RANK", "1")

    def assess(*args):
        raise AssertionError("rank 1 must not evaluate")

    cfg = OmegaConf.create({"analysis": _analysis(), "seed": 0, "method": {"name": "none"}})
    stages = SimpleNamespace(cfg=cfg, template=PromptTemplate(), base=lambda: Model(model, tokenizer, "base/x"))
    assert analyse(cfg, stages, SimpleNamespace(suites=suites, assess=assess), tmp_path) is None
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_mechanistic_experiment_smoke_run_writes_every_analysis(tmp_path):
    env = {**os.environ, "SAFETY_LAB_STORE": str(tmp_path / "store")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "safety_lab",
            "+experiment=mechanistic",
            "+debug=fast",
            "analysis.attack.steps=3",
            "analysis.attack.report_at=[1]",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in (
        "activation_space",
        "column_space",
        "row_space",
        "lipschitz",
        "soft_tokens",
        "refusal_direction",
        "jailbreak",
    ):
        assert (run / f"{name}.json").exists() and (run / f"{name}.png").exists(), name
    tags = {"base", "sft_high", "sft_low", "dpo_high", "dpo_low", "unlearn_high", "unlearn_low"}
    space = json.loads((run / "activation_space.json").read_text())
    assert set(space) == tags and len(space["base"]["layers"]) == 3
    assert all(
        -1 <= layer["silhouette"] <= 1 and 0 <= layer["probe_accuracy"] <= 1
        for v in space.values()
        for layer in v["layers"]
    )
    soft = json.loads((run / "soft_tokens.json").read_text())
    assert set(soft["base"]) == {"1", "2", "4"} and set(soft["base"]["1"]["success"]) == {"0", "1", "3"}
    checks = json.loads((run / "findings.json").read_text())
    assert set(checks["smaller_lr"]) == {"sft", "dpo", "unlearn"}
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"base.harmful/refusal_rate", "sft_low.jailbreak_competing/compliance_rate"} <= set(metrics)
