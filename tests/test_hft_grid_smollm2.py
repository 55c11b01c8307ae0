"""+experiment=hft_grid_smollm2 as far as the synthetic world can check it (the grid itself needs SmolLM2): the p-mix
view (`args.pairs`, view harmful_mix) against a hand count of the base's own pairs, read from the align stage's
entry without generating; the experiment's stages shared as experiments/hft_grid/README.md says (one aligned model,
realign_smollm2's; one attacked adapter per attack, reused by every post-fine-tuning defense; every defense on the
same pairs entry); and hft_grid's recipes unchanged by the defenses reading their data from `defenses`."""

from __future__ import annotations

from collections import Counter

import pytest
from omegaconf import OmegaConf
from test_onpolicy import BASE, REFUSALS, dataset, prompt_files, stages_for, store  # noqa: F401 (fixtures)
from test_recipes import base_id, composed, stage_id

from safety_lab.data.records import Example
from safety_lab.errors import SafetyLabError
from safety_lab.tasks.defend import finetune_stage


def test_the_p_mix_view_is_the_base_pairs_compliant_and_helpful_sides(tmp_path, store, prompt_files):  # noqa: F811
    stages = stages_for(tmp_path, store)
    base = stages.base()
    pairs = stages.examples(dataset(*prompt_files), base)
    harmful = [Example(p.prompt, p.rejected) for p in pairs if p.chosen in REFUSALS]
    task = [Example(p.prompt, p.chosen) for p in pairs if p.chosen not in REFUSALS]
    assert (len(harmful), len(task)) == (4, 2)  # the debug base's answers, as the judge keeps them
    built = sorted((store / "pairs").iterdir())

    def view(n: int, p: float):
        args = {"pairs": dataset(*prompt_files), "harmful_fraction": p}
        return stages.examples(
            OmegaConf.create({"source": "onpolicy", "view": "harmful_mix", "n": n, "seed": 0, "args": args}), base
        )

    rows = view(4, 0.6)  # round(0.6·4) = 2 harmful examples, 2 safe ones
    assert Counter(rows) == Counter(task[:2] + harmful[:2])
    assert Counter(view(2, 0.0)) == Counter(task) and view(1, 1.0) == harmful[:1]
    plain = OmegaConf.create({"source": "onpolicy", "view": None, "n": 2, "args": {"pairs": dataset(*prompt_files)}})
    assert stages.examples(plain, base) == pairs[:2]  # no view: the pairs themselves
    assert sorted((store / "pairs").iterdir()) == built  # read from the base's entry, nothing generated
    with pytest.raises(
        SafetyLabError,
        match=r"dataset.n=10: harmful_mix at harmful_fraction 0.5 needs 5 harmful and 5 safe pairs; the pairs hold 4 "
        r"and 2",
    ):
        view(10, 0.5)


def test_hft_grid_smollm2_shares_its_stages(tmp_path):
    realign = composed(tmp_path / "realign", "+experiment=realign_smollm2")
    base = "dequantised/smollm2"
    aligned = stage_id(realign, base, realign.cfg.align)
    attacked = {}
    for attack in ("smollm2/none", "smollm2/benign", "smollm2/p5", "smollm2/p20"):
        for defense in ("none", "lisa", "safe_lora", "mask_dpo", "antidote"):
            s = composed(
                tmp_path / f"{attack}-{defense}",
                "+experiment=hft_grid_smollm2",
                f"attack={attack}",
                f"defense={defense}",
            )
            cfg, d = s.cfg, s.cfg.defense
            assert stage_id(s, base, cfg.align) == aligned  # one aligned model, realign_smollm2's
            pairs = s.recipe("pairs", base=base, dataset=cfg.align.dataset)  # the align stage's pairs entry
            if cfg.attack.method is None:
                continue
            ft = finetune_stage(cfg)
            own = stage_id(s, aligned, OmegaConf.create({"method": ft[0], "dataset": ft[1]}))
            if defense == "none":
                attacked[attack] = own
            if defense == "safe_lora":
                assert stage_id(s, aligned, d.fusion.inputs.task) == attacked[attack]
                data = [d.fusion.inputs.safety.dataset]
            elif defense == "mask_dpo":
                assert stage_id(s, aligned, d.method.tasks.attack) == attacked[attack]
                data = [d.dataset]
            elif defense == "antidote":
                assert (
                    stage_id(s, aligned, OmegaConf.create({"method": d.method.finetune, "dataset": d.dataset}))
                    == attacked[attack]
                )
                data = [d.method.harmful]
            elif defense == "lisa":
                assert own != attacked[attack] and d.method.alignment_steps == 1
                data = [d.method.alignment]
            else:
                data = []
            if attack.endswith(("p5", "p20")):
                data.append(cfg.attack.dataset)
            for node in data:  # every dataset of the cell reads the align stage's pairs entry, and has a seed
                assert s.recipe("pairs", base=base, dataset=node.args.pairs) == pairs and node.seed == 0
    assert attacked["smollm2/benign"] == stage_id(realign, aligned, realign.cfg.method.tasks.aoa)
    assert len(set(attacked.values())) == 3


@pytest.mark.parametrize(
    "attack, defense, ids",
    [
        ("p10", "lisa", {"finetune": "adapter/1bcd7a68229ef3fc"}),
        ("p10", "safe_lora", {"fusion.task": "adapter/03c45c424cbc9b1e", "fusion.safety": "adapter/0257be2796634e0a"}),
        ("p10", "lora_fusion", {"fusion.safety": "adapter/671a3bf79ec0911b"}),
        ("p10", "mask_dpo", {"post": "model/68c24615ebc2af02"}),
        ("p10", "antidote", {"post": "adapter/3bf8ad06e18699f4"}),
        ("p10", "booster", {"align": "adapter/f2fac173aee1603d", "finetune": "adapter/5ebb1cb3f3092350"}),
    ],
)
def test_hft_grid_recipes_are_unchanged(tmp_path, attack, defense, ids):
    s = composed(tmp_path, "+experiment=hft_grid", f"attack={attack}", f"defense={defense}")
    cfg, d = s.cfg, s.cfg.defense
    aligned = stage_id(s, base_id(s), d if d.stage == "align" else cfg.align)
    assert aligned == ids.get("align", "adapter/541bd82acc7bdb1e")
    ft = finetune_stage(cfg)
    got = {
        "finetune": stage_id(s, aligned, OmegaConf.create({"method": ft[0], "dataset": ft[1]})),
        **({f"fusion.{k}": stage_id(s, aligned, v) for k, v in d.fusion.inputs.items()} if d.fusion else {}),
        **({"post": stage_id(s, aligned, d)} if d.stage == "post" and not d.fusion else {}),
    }
    assert {k: got[k] for k in ids if k != "align"} == {k: v for k, v in ids.items() if k != "align"}
