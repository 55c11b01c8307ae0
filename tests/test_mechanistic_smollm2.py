"""The mechanistic study as `+experiment=mechanistic_smollm2` runs it on a real chat model, checked on tiny models:
its SFT stage is the methods study's adapter (one recipe), steering moves a planted direction by exactly what it
should, the row and column space read a LoRA stage's ΔW = s·B·A on the projections it adapts, the refusal
direction's causal test and its checks, and the experiment end to end on the synthetic tiny model."""

from __future__ import annotations

import copy
import json
from collections import Counter

import pytest
import torch
from conftest import build_tiny_llama, build_tiny_tokenizer
from helpers import run_safety_lab
from omegaconf import OmegaConf
from peft import LoraConfig, get_peft_model
from test_analysis_study import _analysis, _assess, _study, build_synthetic
from test_recipes import composed, stage_id

from safety_lab.analysis import geometry as g
from safety_lab.analysis.hooks import activations, steer
from safety_lab.analysis.study import check_analysis, findings
from safety_lab.data.io import read_jsonl
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.rejudge import rejudge
from safety_lab.tasks.results import write_results

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def test_the_sft_stage_is_the_methods_study_adapter(tmp_path):
    """Same recipe as methods_smollm2's `method=sft`, so the store reuses the adapter that study trained."""
    mechanistic = composed(tmp_path, "+experiment=mechanistic_smollm2")
    methods = composed(tmp_path, "+experiment=methods_smollm2")
    base = "dequantised/0123456789abcdef"
    adapter = stage_id(mechanistic, base, mechanistic.cfg.analysis.models.sft)
    assert adapter == stage_id(methods, base, methods.cfg)
    assert mechanistic.cfg.model.max_length == methods.cfg.model.max_length == 128  # what the fit cuts to


def test_steering_removes_a_planted_direction_exactly_and_adds_it_by_the_scale():
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_llama(len(tokenizer), seed=0).eval()
    prompts = ["what is two plus two", "tell me a joke about computers", "list three primary colours"]
    r = torch.randn(32, generator=torch.Generator().manual_seed(3))
    unit = r / r.norm()
    before, _ = activations(model, tokenizer, PromptTemplate(), prompts)
    with steer(model, r, "ablate"):
        ablated, _ = activations(model, tokenizer, PromptTemplate(), prompts)
    assert (ablated["resid"] @ unit).abs().max() < 1e-5  # at every layer's input, every prompt
    with steer(model, r, "add", layer=1, coefficient=2.5):
        added, _ = activations(model, tokenizer, PromptTemplate(), prompts)
    # the layer's input moves by exactly 2.5·r: its projection on r̂ by 2.5·‖r‖, nothing else at that layer
    assert torch.allclose(added["resid"][1] - before["resid"][1], 2.5 * r.expand(3, -1), atol=1e-5)
    assert torch.allclose(added["resid"][1] @ unit - before["resid"][1] @ unit, 2.5 * r.norm().expand(3), atol=1e-5)
    assert torch.equal(added["resid"][0], before["resid"][0])


@pytest.fixture(scope="module")
def synthetic():
    return build_synthetic()


@pytest.fixture(scope="module")
def lora_pair(synthetic):
    """The synthetic tiny model and a copy with a rank-2 LoRA on the attention projections (random B, so ΔW ≠ 0),
    merged as the analyse task merges a stage; with each projection's s·B·A."""
    _, _, model, _ = synthetic
    config = LoraConfig(r=2, lora_alpha=6, target_modules=ATTENTION, init_lora_weights=True)
    peft = get_peft_model(copy.deepcopy(model), config)
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for name, module in peft.named_modules():
        if hasattr(module, "lora_B") and "default" in module.lora_B:
            with torch.no_grad():
                module.lora_B["default"].weight.copy_(torch.randn(module.lora_B["default"].weight.shape, generator=gen))
            layer, proj = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
            b, a = module.lora_B["default"].weight, module.lora_A["default"].weight
            deltas[(layer, proj)] = (module.scaling["default"] * b @ a).detach()
    return model, peft.merge_and_unload().eval(), deltas


def test_row_and_column_space_read_a_lora_stages_delta_w(synthetic, lora_pair, tmp_path):
    base, tuned, deltas = lora_pair
    _, tokenizer, _, suites = synthetic
    study = _study(
        synthetic,
        tmp_path,
        analyses=["column_space", "row_space"],
        matrices=ATTENTION,
        row_space_k=3,
        models={"tuned": {"method": {"name": "sft", "lr": 1e-3}}},
    )
    study.run({"base": base, "tuned": tuned}, _assess(synthetic))
    row = json.loads((tmp_path / "row_space.json").read_text())["tuned"]["matrices"]
    column = json.loads((tmp_path / "column_space.json").read_text())["tuned"]["matrices"]
    assert set(row) == set(column) == {f"layer{i}.{p}" for i in (0, 1) for p in ATTENTION}
    safe = study.slices["utility"]
    acts, _ = activations(tuned, tokenizer, PromptTemplate(), study.prompts, inputs=("q_proj", "o_proj"))
    for (i, proj), delta in deltas.items():
        key = f"layer{i}.{proj}"
        if proj in ("q_proj", "o_proj"):  # k_proj and v_proj read q_proj's input
            expected = g.row_space_projections(delta, acts[proj][i][safe], 3).mean(0)
            assert row[key]["safe"] == pytest.approx(expected.tolist(), rel=1e-3, abs=1e-6)
        assert row[key]["safe"][2] < 1e-4 * row[key]["safe"][0]  # rank 2: nothing beyond the adapter's rank
        w_pre = base.model.layers[i].self_attn.get_submodule(proj).weight.detach()
        assert column[key]["relative_change"] == pytest.approx(float(delta.norm() / w_pre.norm()), rel=1e-4)
    with pytest.raises(SafetyLabError, match="analysis.matrices: 'lm_head' is not one of"):
        check_analysis(_analysis(matrices=["lm_head"]), suites)


def test_the_causal_test_generates_with_the_selected_direction_and_states_its_checks(synthetic, tmp_path):
    _, _, model, _ = synthetic
    study = _study(synthetic, tmp_path, analyses=["refusal_direction"], direction_n=5, add_scale=4.0, batch_size=7)
    columns, rows = study.run({"base": model}, _assess(synthetic))
    result = json.loads((tmp_path / "refusal_direction.json").read_text())["base"]
    causal = result["causal"]
    # the steered generations are rows of their own: all 12 harmful prompts ablated, all 12 utility ones added
    steered = [(row["model"], row["suite"]) for row in rows[36:]]
    assert steered == [("base+ablated", "harmful")] * 12 + [("base+added", "utility")] * 12
    # written as the analyse task writes them, rejudge reads them back: the same judge gives the same rates
    write_results(tmp_path, columns, rows, main="none")
    rejudge(tmp_path, ["judge=exact"])
    rejudged = json.loads((tmp_path / "metrics_exact.json").read_text())
    assert rejudged["base+ablated.harmful/compliance_rate"] == causal["unsafe_compliance"]["ablated"]
    assert rejudged["base+added.utility/refusal_rate"] == result["added_generation"]["utility/refusal_rate"]
    assert rejudged["base.harmful/compliance_rate"] == causal["unsafe_compliance"]["before"]
    assert causal["unsafe_compliance"] == {
        "before": columns["base"]["harmful/compliance_rate"],
        "ablated": result["ablated_generation"]["harmful/compliance_rate"],
    }
    assert causal["safe_refusal"]["before"] == columns["base"]["utility/refusal_rate"]
    # the scores of layer 1 are those of the first 5 prompts per side, the direction added 4 times
    resid = activations(model, study.tokenizer, PromptTemplate(), study.prompts)[0]["resid"][1]
    safe, unsafe, labels = study.sides()
    r = g.difference_of_means(torch.cat([resid[safe], resid[unsafe]]), labels)
    with steer(model, r, "add", layer=1, coefficient=4.0):
        _, logits = activations(
            model, study.tokenizer, PromptTemplate(), [p.prompt for p in study.suites["utility"][:5]]
        )
    assert result["layers"][1]["added_safe"] == pytest.approx(float(g.refusal_score(logits, study.refusal_ids).mean()))
    checks = json.loads((tmp_path / "findings.json").read_text())
    assert checks["ablation_raises_compliance"]["base"]["holds"] == (
        causal["unsafe_compliance"]["ablated"] > causal["unsafe_compliance"]["before"]
    )
    assert (tmp_path / "refusal_direction.png").exists()


def test_the_causal_checks_on_constructed_numbers():
    results = {
        "jailbreak": {"base": {}, "sft": {}},
        "refusal_direction": {
            "base": {
                "causal": {
                    "unsafe_compliance": {"before": 0.9, "ablated": 0.9},
                    "safe_refusal": {"before": 0.0, "added": 0.5},
                }
            },
            "sft": {
                "causal": {
                    "unsafe_compliance": {"before": 0.25, "ablated": 0.8},
                    "safe_refusal": {"before": 0.1, "added": 0.05},
                }
            },
        },
    }
    checks = findings(results, OmegaConf.create({"jailbreak_suites": []}))
    assert checks["ablation_raises_compliance"]["sft"] == {"before": 0.25, "ablated": 0.8, "holds": True}
    assert not checks["ablation_raises_compliance"]["base"]["holds"]  # equal is not raised
    assert checks["addition_raises_refusal"]["base"]["holds"] and not checks["addition_raises_refusal"]["sft"]["holds"]


@pytest.mark.slow
def test_the_experiment_runs_on_the_synthetic_tiny_model(tmp_path):
    """+experiment=mechanistic_smollm2 with the synthetic world in place of SmolLM2 and the standard suites: the SFT
    stage (LoRA on q/k/v/o) trained, merged and analysed with every analysis the experiment names."""
    result = run_safety_lab(
        "+experiment=mechanistic_smollm2",
        "+debug=fast",
        "model=tiny_llama",
        "eval=synthetic",
        *(f"~eval.suites.{name}" for name in ("harmbench", "donotanswer", "jailbreak_dan", "over_refusal", "harmless")),
        "eval.max_new_tokens=null",
        "dataset@analysis.models.sft.dataset=safety_sft",
        "analysis.models.sft.dataset.n=64",
        "analysis.safe_suite=utility",
        "analysis.unsafe_suite=harmful",
        "analysis.jailbreak_suites=[jailbreak_competing]",
        "analysis.refusal=refuse",
        "analysis.direction_n=4",
        f"hydra.run.dir={tmp_path}/run",
        store=tmp_path / "store",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    for name in ("activation_space", "column_space", "row_space", "refusal_direction", "jailbreak"):
        assert (run / f"{name}.json").exists() and (run / f"{name}.png").exists(), name
    row = json.loads((run / "row_space.json").read_text())["sft"]["matrices"]
    assert set(row) == {f"layer{i}.{p}" for i in range(3) for p in ATTENTION}
    assert all(len(v["safe"]) == 8 and v["safe"][0] > 0 for v in row.values())  # row_space_k 8: the rank
    checks = json.loads((run / "findings.json").read_text())
    assert set(checks["silhouette_up"]) == set(checks["row_space_carries_unsafe"]) == {"sft"}
    assert set(checks["ablation_raises_compliance"]) == set(checks["addition_raises_refusal"]) == {"base", "sft"}
    assert set(checks["jailbreaks_closer_to_safe"]["sft"]) == {"jailbreak_competing"}
    # each model's rows on every suite, and its steered ones: the whole unsafe suite ablated, the safe one added
    models = Counter((row["model"], row["suite"]) for row in read_jsonl(run / "generations.jsonl"))
    assert {tag for tag, _ in models} == {"base", "sft", "base+ablated", "base+added", "sft+ablated", "sft+added"}
    for tag in ("base", "sft"):
        assert [k for k in models if k[0].startswith(f"{tag}+")] == [
            (f"{tag}+ablated", "harmful"),
            (f"{tag}+added", "utility"),
        ]
        assert models[(f"{tag}+ablated", "harmful")] == models[(tag, "harmful")] > 0
        assert models[(f"{tag}+added", "utility")] == models[(tag, "utility")] > 0
    rejudge(run, ["judge=exact"])  # the run's own judge again: the causal test's rates from its rows
    rejudged, causal = (json.loads((run / f).read_text()) for f in ("metrics_exact.json", "refusal_direction.json"))
    assert rejudged["sft+ablated.harmful/compliance_rate"] == causal["sft"]["causal"]["unsafe_compliance"]["ablated"]
