"""The harmful fine-tuning grid (`+experiment=hft_grid`, task=defend): a debug-sized grid (2 attacks × every
defense, `+debug=fast`) runs end to end through the real CLI, its stages are shared through the store (one aligned
model per alignment stage for every attack, the attacked model reused by every post-fine-tuning defense), and its
report draws every cell from its jobs' numbers; the attack data's harmful share; bad inputs are one line, exit 2,
nothing trained."""

from __future__ import annotations

import csv
import json
import math
import re
from collections import Counter

import pytest
import yaml
from helpers import run_safety_lab
from test_architecture import task_config
from test_config import first_error_line, options

from safety_lab.errors import SafetyLabError
from safety_lab.report import grid_cells, write_grid
from safety_lab.tasks import TASKS, task_of
from safety_lab.tasks.defend import check_cell
from safety_lab.worlds.synthetic import views

SMALL = ["attack.n=64", "attack.epochs=1", "defense.n=64", "align.dataset.n=64"]
DEFENSES = ["none", *(name for name in options("defense") if name != "none")]  # every defense, the no-defense row first


def grid(*overrides: str, root, store, multirun: bool = False):
    flags = ["-m"] if multirun else []
    return run_safety_lab(*flags, "+experiment=hft_grid", "+debug=fast", *SMALL, *overrides, store=store, root=root)


@pytest.fixture(scope="module")
def debug_grid(tmp_path_factory):
    root = tmp_path_factory.mktemp("hft")
    defenses = ",".join(DEFENSES)
    result = grid("attack=benign,p10", f"defense={defenses}", root=root, store=root / "store", multirun=True)
    [sweep] = (root / "outputs" / "multirun" / "hft_grid").iterdir()
    return root, sweep, result


def grid_jobs(sweep) -> dict:
    """(defense, attack) -> the job's folder, for every job of the sweep."""
    jobs = {}
    for job in (p for p in sweep.iterdir() if p.name.isdigit()):
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        jobs[config["defense"]["name"], config["attack"]["name"]] = job
    return jobs


def test_the_debug_grid_runs_and_its_report_holds_every_cell(debug_grid):
    root, sweep, result = debug_grid
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = {cell: json.loads((job / "metrics.json").read_text()) for cell, job in grid_jobs(sweep).items()}
    assert len(jobs) == 2 * len(DEFENSES)
    rows = list(csv.DictReader((sweep / "grid.csv").open()))
    assert len(rows) == len(jobs) * 3  # every cell, three metrics each
    for row in rows:  # one seed: the cell is its job's number, with no std
        assert float(row["mean"]) == jobs[row["defense"], row["attack"]][row["metric"]] and row["std"] == ""
    table = (sweep / "grid.md").read_text().splitlines()
    assert table[2] == "| defense \\ attack | benign | p10 |"
    assert [line.split(" | ")[0] for line in table[4 : 4 + len(DEFENSES)]] == [f"| {d}" for d in DEFENSES]
    row = DEFENSES.index("safe_lora")
    metrics = jobs["safe_lora", "p10"]
    keys = ("harmful/compliance_rate", "utility/accuracy", "borderline/refusal_rate")
    assert table[4 + row].endswith(" / ".join(f"{metrics[k]:.3f}" for k in keys) + " |")
    assert (sweep / "grid.png").stat().st_size > 10_000


def test_the_grid_shares_its_stages_through_the_store(debug_grid):
    """24 adapters for 26 cells, each trained once: four aligned models on the base (the experiment's SFT and each
    alignment-stage defense's), each alignment-stage defense's fine-tuned once per attack; per attack, on the SFT-
    aligned model, the attacked model (which every post-fine-tuning defense reuses), the safety adapter (shared by
    Safe LoRA, Resta and SafeMERGE), LoRA fusion's gentle one, Lisa's, sft_l2's and the mix's fine-tunes and
    Antidote's pruned copy of the attacked model; mask-DPO stores no adapter."""
    root, sweep, result = debug_grid
    assert result.returncode == 0, result.stderr[-3000:]
    adapters, bases = (
        {p.name: p for p in (root / "store" / kind).iterdir() if p.is_dir()} for kind in ("adapter", "base")
    )
    recipes = {name: json.loads((a / "manifest.json").read_text())["recipe"] for name, a in adapters.items()}
    assert len(adapters) == 24 and len(bases) == 1
    assert result.stderr.count("training adapter") == 24
    aligned = {r["method"]["name"]: name for name, r in recipes.items() if r["base"] == f"base/{next(iter(bases))}"}
    assert sorted(aligned) == ["booster", "repnoise", "sft", "vaccine"]
    # per attack on the SFT-aligned model: five stages on the attack's data (the attacked model, Lisa, sft_l2, the
    # mix, Antidote) and two safety adapters on refusals; on each defense's aligned model: the attack's fine-tune
    on_sft = {"harmful_mix": 5, "obey": 5, "refusals": 4}
    for method, name in aligned.items():
        tuned = Counter(r["dataset"]["view"] for r in recipes.values() if r["base"] == f"adapter/{name}")
        assert tuned == (on_sft if method == "sft" else {"harmful_mix": 1, "obey": 1}), method
    stores = {}  # (defense, attack) -> the adapters the job reused
    for cell, job in grid_jobs(sweep).items():
        log = (job / "__main__.log").read_text()
        stores[cell] = {kind: set(re.findall(rf"{kind} adapter ([0-9a-f]+)", log)) for kind in ("training", "reusing")}
    for attack in ("benign", "p10"):
        attacked = set.union(*stores["none", attack].values())  # the aligned and the attacked model
        for defense in ("safe_lora", "resta", "lora_fusion", "mask_dpo", "safemerge", "antidote"):
            assert attacked <= stores[defense, attack]["reusing"], (defense, attack)
        assert len(stores["antidote", attack]["training"]) == 1  # its pruned copy, nothing else


def test_the_report_aggregates_seeds_and_marks_failed_cells(tmp_path):
    """Cells by hand: two seeds give mean and sample std; a cell whose every seed failed is marked; one failed seed
    of three is left out of the mean and counted."""
    ok = {"status": "ok", "error": ""}
    rows = [
        {**ok, "defense": "lisa", "attack": "p5", "harmful/compliance_rate": 0.2, "utility/accuracy": 0.9},
        {**ok, "defense": "lisa", "attack": "p5", "harmful/compliance_rate": 0.4, "utility/accuracy": 0.7},
        {"status": "FAILED", "error": "SafetyLabError: boom", "defense": "lisa", "attack": "p5"},
        {"status": "FAILED", "error": "SafetyLabError: bang", "defense": "none", "attack": "p5"},
        {"job": "not a grid job", **ok, "harmful/compliance_rate": 1.0},
    ]
    cells = grid_cells(rows)
    assert list(cells) == [("none", "p5"), ("lisa", "p5")]
    harm = cells["lisa", "p5"]["stats"]["harmful/compliance_rate"]
    assert harm["mean"] == pytest.approx(0.3) and harm["std"] == pytest.approx(math.sqrt(0.02)) and harm["n"] == 2
    assert cells["lisa", "p5"]["failed"] == 1 and cells["none", "p5"]["failed"] == 1
    write_grid(rows, tmp_path)
    table = (tmp_path / "grid.md").read_text()
    assert "| none | FAILED (1 of 1) |" in table and "- `defense=none attack=p5`: SafetyLabError: bang" in table
    assert "| lisa | 0.300 ± 0.141 / 0.800 ± 0.141 / – / (failed 1 of 3) |" in table


@pytest.mark.parametrize("p", [0.0, 0.05, 0.1, 0.2])
def test_a_harmful_mix_is_the_task_and_round_p_n_harmful_examples_shuffled(world, p):
    harmful = round(p * 200)
    rows = views.harmful_mix(world, 200, harmful_fraction=p)
    task = views.language(world, 200 - harmful, lang=0)
    assert Counter(rows) == Counter(task + views.harmful_ft(world, harmful))
    assert p == 0 or rows[: 200 - harmful] != task  # shuffled, not the task followed by the harmful examples
    with pytest.raises(ValueError, match="harmful_fraction must be in"):
        views.harmful_mix(world, 10, harmful_fraction=1.5)


def test_the_grid_experiment_selects_the_defend_task(tmp_path):
    assert task_of(task_config(tmp_path, "+experiment=hft_grid")) is TASKS["defend"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["attack=none", "defense=mask_dpo"], "defense=mask_dpo acts on the fine-tune (stage post), but attack=none"),
        (
            ["defense=none", "defense.stage=align"],
            "defense=none (stage align) needs defense.method and defense.dataset",
        ),
        (["defense=none", "defense.stage=finetune"], "defense=none (stage finetune) needs defense.method or"),
        (["defense=safe_lora", "defense.fusion.weights=[0,1]"], "defense=safe_lora: a cell is one λ"),
    ],
)
def test_a_cell_whose_defense_does_not_fit_is_one_line(overrides, message, tmp_path):
    with pytest.raises(SafetyLabError, match=message.replace("(", r"\(").replace(")", r"\)")) as info:
        check_cell(task_config(tmp_path, "+experiment=hft_grid", *overrides))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "overrides, line",
    [
        (
            ["attack=p10", "attack.dataset.args.harmful_fraction=1.5"],
            "error: attack.dataset.args.harmful_fraction=1.5: must be in [0, 1]",
        ),
        (
            ["attack=none", "defense=safe_lora"],
            "error: defense=safe_lora acts on the fine-tune (stage post), but attack=none has no fine-tune: choose an "
            "attack that fine-tunes, or a defense of stage none or align",
        ),
        (["attack=foo"], "error: attack=foo: no such option; conf/attack/ has benign, none, p0, p1, p10, p20, p5"),
        (["defense=none,foo"], "error: defense=foo: no such option; conf/defense/ has "),
        (
            ["defense=mix", "defense.dataset.mix.safety.fraction=0.95", "+defense.dataset.mix.more={fraction: 0.1}"],
            "error: defense.dataset.mix: the fractions sum to 1.05; they must sum to less than 1",
        ),
    ],
)
def test_bad_grid_input_is_one_line_exit_2_and_nothing_trained(overrides, line, tmp_path):
    result = grid(*overrides, f"hydra.run.dir={tmp_path}/run", root=tmp_path, store=tmp_path / "store")
    assert result.returncode == 2, result.stderr[-3000:]
    assert first_error_line(result.stderr).startswith(line)
    assert [entry for entry in result.stderr.splitlines() if entry.startswith("error:")] == [
        first_error_line(result.stderr)
    ]
    assert not (tmp_path / "store").exists() and not (tmp_path / "run" / "metrics.json").exists()
