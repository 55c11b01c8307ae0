"""The preference objectives beside DPO (IPO, cDPO, robust DPO, SimPO, ORPO, KTO) and the unlearning objectives beside
NPO (SimNPO, RMU): each loss against a hand computation and, where TRL has it, against TRL's own implementation on the
same log-probs; each method's `train` run for a few steps on the tiny model, where its loss must fall; and their
settings out of range as one line before anything loads."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from helpers import run_safety_lab
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_config import CONF, compose_resolved

from safety_lab.config import check_values
from safety_lab.data.collate import IGNORE
from safety_lab.data.records import Preference, UnpairedPreference
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.methods import build_method
from safety_lab.methods.kto import kl_partners, kto_objective, unpair, weight_advice
from safety_lab.methods.losses import (
    conservative_dpo_loss,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    log1mexp,
    masked_mse,
    orpo_loss,
    rmu_control_vector,
    rmu_loss,
    robust_dpo_loss,
    sequence_logps,
    simnpo_term,
    simpo_loss,
)
from safety_lab.sources import load_examples

log, sig = math.log, lambda x: 1 / (1 + math.exp(-x))
TOL = {"rel": 1e-6, "abs": 1e-7}  # float32 against float64 hand computations and against TRL's float32 code


def logsig(x: float) -> float:
    return -math.log1p(math.exp(-x))


# ---- hand computations -----------------------------------------------------------------------------------------
PC, PR, RC, RR = ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0])  # DPO margins / β: 2 and −1


def pair_tensors():
    return [torch.tensor(v) for v in (PC, PR, RC, RR)]


def test_ipo_matches_hand_computation():
    # h = (π_c − ref_c) − (π_r − ref_r) = 2, −1; target 1/(2·0.1) = 5
    assert ipo_loss(*pair_tensors(), beta=0.1).item() == pytest.approx(((2 - 5) ** 2 + (-1 - 5) ** 2) / 2, **TOL)


def test_conservative_and_robust_dpo_match_hand_computation():
    margins, eps = (0.2, -0.1), 0.1
    cdpo = sum(-(1 - eps) * logsig(m) - eps * logsig(-m) for m in margins) / 2
    rdpo = sum((-(1 - eps) * logsig(m) + eps * logsig(-m)) / (1 - 2 * eps) for m in margins) / 2
    assert conservative_dpo_loss(*pair_tensors(), beta=0.1, label_smoothing=eps).item() == pytest.approx(cdpo, **TOL)
    assert robust_dpo_loss(*pair_tensors(), beta=0.1, label_smoothing=eps).item() == pytest.approx(rdpo, **TOL)
    # no smoothing: both are sigmoid DPO
    for loss in (conservative_dpo_loss, robust_dpo_loss):
        assert loss(*pair_tensors(), label_smoothing=0.0).item() == pytest.approx(dpo_loss(*pair_tensors()).item())


def test_simpo_matches_hand_computation():
    chosen, rejected = torch.tensor([-0.5, -2.0]), torch.tensor([-1.5, -1.0])
    # β·(ā_c − ā_r) − γ with β 2, γ = 2·0.5 = 1: 2·1 − 1 = 1 and 2·(−1) − 1 = −3
    expected = -(logsig(1.0) + logsig(-3.0)) / 2
    assert simpo_loss(chosen, rejected, beta=2.0, gamma_beta_ratio=0.5).item() == pytest.approx(expected, **TOL)


def test_orpo_matches_hand_computation():
    chosen, rejected = torch.tensor([log(0.5), log(0.8)]), torch.tensor([log(0.2), log(0.9)])
    odds = lambda p: p / (1 - p)  # noqa: E731
    ratios = [log(odds(0.5) / odds(0.2)), log(odds(0.8) / odds(0.9))]
    expected = 1.25 - 0.1 * (logsig(ratios[0]) + logsig(ratios[1])) / 2
    assert orpo_loss(chosen, rejected, torch.tensor(1.25), 0.1).item() == pytest.approx(expected, **TOL)
    # log(1 − eˣ) on both sides of −log 2, and finite at a probability of 1
    x = torch.tensor([-5.0, -0.7, -0.6, -1e-6])
    assert log1mexp(x).tolist() == pytest.approx([log(1 - math.exp(v)) for v in x.tolist()], rel=1e-5)
    assert torch.isfinite(log1mexp(torch.tensor([0.0]))).all()


def test_kto_matches_hand_computation():
    logps, ref = torch.tensor([-1.0, -3.0, -2.0]), torch.tensor([-2.0, -2.0, -2.0])  # rewards 1, −1, 0
    desirable = torch.tensor([True, False, True])
    # z0 from mismatched pairs: mean(0.5, 0.1) = 0.3; a negative mean clamps to 0
    z0 = kto_reference_point(torch.tensor([-1.5, -1.9]), torch.tensor([-2.0, -2.0]))
    assert z0.item() == pytest.approx(0.3, **TOL)
    assert kto_reference_point(torch.tensor([-3.0]), torch.tensor([-2.0])).item() == 0.0
    expected = (1.0 * (1 - sig(0.1 * (1 - 0.3))) + 2.0 * (1 - sig(0.1 * (0.3 + 1))) + 1.0 * (1 - sig(0.1 * -0.3))) / 3
    loss = kto_loss(logps, ref, desirable, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=2.0)
    assert loss.item() == pytest.approx(expected, **TOL)


def test_simnpo_matches_hand_computation():
    forget = torch.tensor([-0.4, -2.0])  # per-token mean log-probs
    # (2/β)·mean softplus(β·ā + γ), β 2.5, γ 0.5: softplus(−0.5), softplus(−4.5)
    expected = 2 / 2.5 * (log(1 + math.exp(-0.5)) + log(1 + math.exp(-4.5))) / 2
    assert simnpo_term(forget, beta=2.5, gamma=0.5).item() == pytest.approx(expected, **TOL)
    # as −(2/β)·log σ(−β·ā − γ)
    assert simnpo_term(forget, 2.5, 0.5).item() == pytest.approx(-2 / 2.5 * (logsig(0.5) + logsig(4.5)) / 2, **TOL)


def test_rmu_matches_hand_computation():
    # two rows of three positions, hidden size 2; the mask keeps three forget and two retain positions
    forget = torch.tensor([[[1.0, 2.0], [3.0, 0.0], [9.0, 9.0]], [[0.0, 0.0], [9.0, 9.0], [9.0, 9.0]]])
    forget_mask = torch.tensor([[True, True, False], [True, False, False]])
    control = torch.tensor([1.0, 1.0])
    # squared errors: (0 + 1), (4 + 1), (1 + 1) over 3 positions × 2 units
    assert masked_mse(forget, control, forget_mask).item() == pytest.approx(8 / 6)
    retain = torch.tensor([[[1.0, 1.0], [2.0, 2.0]]])
    frozen = torch.tensor([[[1.0, 0.0], [2.0, 2.0]]])
    retain_mask = torch.tensor([[True, True]])
    loss = rmu_loss(forget, retain, frozen, control, forget_mask, retain_mask, retain_weight=1200.0)
    assert loss.item() == pytest.approx(8 / 6 + 1200 * 1 / 4)
    # the unmasked case is F.mse_loss, as the WMDP code computes it
    full = torch.ones(2, 3, dtype=torch.bool)
    assert masked_mse(forget, control, full).item() == pytest.approx(
        torch.nn.functional.mse_loss(forget, control.expand_as(forget)).item()
    )
    u = rmu_control_vector(8, 6.5, torch.Generator().manual_seed(0))
    assert u.norm().item() == pytest.approx(6.5) and (u >= 0).all()
    assert torch.equal(u, rmu_control_vector(8, 6.5, torch.Generator().manual_seed(0)))


def test_kto_weight_advice_is_trls_range_check():
    # 3 desirable, 1 undesirable, weights 1 and 1: λ_D·n_D / (λ_U·n_U) = 3 > 4/3; λ_D in [1/3, 4/9] or λ_U in [9/4, 3]
    assert weight_advice(3, 1, 1.0, 1.0).endswith(
        "= 3, outside [1, 4/3] (Ethayarajh et al., eq. 8); set EITHER method.desirable_weight in [0.333, 0.444] "
        "OR method.undesirable_weight in [2.25, 3]"
    )
    # 1 desirable, 3 undesirable: ratio 1/3 < 1; λ_D in [3, 4] or λ_U in [1/4, 1/3]
    assert weight_advice(1, 3, 1.0, 1.0).endswith(
        "desirable_weight in [3, 4] OR method.undesirable_weight in [0.25, 0.333]"
    )
    assert weight_advice(5, 0, 1.0, 1.0).startswith("method=kto: 5 desirable and 0 undesirable rows give")  # 0 as 1
    assert weight_advice(3, 1, 0.4, 1.0) == weight_advice(3, 1, 1.0, 2.5) == ""  # ratio 1.2: in range
    assert weight_advice(2, 2, 1.0, 5.0) == ""  # equal counts (pairs): no advice, as in TRL


def test_kto_rows_and_mismatched_partners():
    pairs = [Preference("p0", "c0", "r0"), Preference("p1", "c1", "r1"), Preference("p1", "c2", "r2")]
    rows = unpair(pairs)
    assert rows == [
        UnpairedPreference("p0", "c0", True),
        UnpairedPreference("p1", "c1", True),
        UnpairedPreference("p1", "c2", True),
        UnpairedPreference("p0", "r0", False),
        UnpairedPreference("p1", "r1", False),
        UnpairedPreference("p1", "r2", False),
    ]
    # the nearest earlier row (cyclically) with another prompt
    assert kl_partners(rows) == [5, 0, 0, 2, 3, 3]
    with pytest.raises(SafetyLabError, match="two different prompts"):
        kl_partners(unpair(pairs[1:]))


# ---- against TRL ---------------------------------------------------------------------------------------------
def seeded_logps(n: int = 6, seed: int = 0):
    """Per-token mean log-probs in (−3, −0.05): policy chosen, rejected, reference chosen, rejected."""
    g = torch.Generator().manual_seed(seed)
    return [-(torch.rand(n, generator=g) * 2.95 + 0.05) for _ in range(4)]


def trl_self(**attributes):
    """What TRL's loss methods read of `self`: their hyperparameters and an accelerator's device."""
    return SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), alpha=0.0, **attributes)


def test_simpo_and_conservative_dpo_equal_trl_cpo_loss():
    """trl.experimental.cpo.CPOTrainer.cpo_loss, called with our tensors: `simpo` (simpo_gamma = γ = β·γ/β) on
    per-token mean log-probs, and `sigmoid` with label_smoothing on DPO's log-ratios, which is cDPO's formula (TRL's
    DPOTrainer sigmoid loss carried it until TRL 1.0)."""
    from trl.experimental.cpo import CPOTrainer

    pc, pr, rc, rr = seeded_logps()
    simpo = trl_self(beta=2.0, loss_type="simpo", simpo_gamma=2.0 * 0.5, label_smoothing=0.0)
    trl = CPOTrainer.cpo_loss(simpo, pc, pr)[0].mean()
    assert simpo_loss(pc, pr, beta=2.0, gamma_beta_ratio=0.5).item() == pytest.approx(trl.item(), **TOL)
    cdpo = trl_self(beta=0.1, loss_type="sigmoid", label_smoothing=0.1)
    trl = CPOTrainer.cpo_loss(cdpo, pc - rc, pr - rr)[0].mean()
    ours = conservative_dpo_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.1)
    assert ours.item() == pytest.approx(trl.item(), **TOL)


def test_orpo_equals_trl_odds_ratio_loss():
    """trl.experimental.orpo.ORPOTrainer: loss = policy_nll_loss − odds_ratio_loss(...).mean(), β = λ."""
    from trl.experimental.orpo import ORPOTrainer

    pc, pr, _, _ = seeded_logps(seed=1)
    nll = torch.tensor(1.7)
    trl = nll - ORPOTrainer.odds_ratio_loss(trl_self(beta=0.1), pc, pr)[0].mean()
    assert orpo_loss(pc, pr, nll, odds_ratio_weight=0.1).item() == pytest.approx(trl.item(), **TOL)


def tiny_lora_logps(policy, input_ids, attention_mask, completion_mask):
    """(policy, reference) summed log-probs and token counts of the completion tokens: the reference is the adapter
    disabled, as in TRL's PEFT path and ours."""
    labels = input_ids.masked_fill(completion_mask == 0, IGNORE)
    with torch.no_grad():
        logps, counts = sequence_logps(policy(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
        with policy.disable_adapter():
            ref, _ = sequence_logps(policy(input_ids=input_ids, attention_mask=attention_mask).logits, labels)
    return logps, ref, counts


def test_ipo_and_robust_dpo_equal_trl_dpo_trainer(tiny_hf_model, tmp_path):
    """TRL's DPOTrainer (`ipo`: per-token mean log-ratios; `robust`) and our losses score the same batch of the same
    LoRA model to the same loss; and `sigmoid` again, as test_preference_losses does."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_model)
    rows = {
        "prompt": ["what is two plus two", "how do i bake bread", "list three primary colours"],
        "chosen": [" two plus two is four", " mix flour water salt", " red yellow and blue"],
        "rejected": [" i can not help", " the sea is wide and blue", " a spider has eight legs"],
    }
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=3,
        beta=0.1,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_hf_model),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )  # random B: policy ≠ reference
    inputs = next(iter(trainer.get_train_dataloader()))
    logps, ref, counts = tiny_lora_logps(
        trainer.model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    )
    mean, ref_mean = logps / counts, ref / counts
    ours = {
        ("sigmoid", 0.0): dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1),
        ("ipo", 0.0): ipo_loss(*mean.chunk(2), *ref_mean.chunk(2), beta=0.1),
        ("robust", 0.1): robust_dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1, label_smoothing=0.1),
        ("robust", 0.3): robust_dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1, label_smoothing=0.3),
    }
    for (loss_type, smoothing), loss in ours.items():
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], smoothing
        with torch.no_grad():
            trl = trainer.compute_loss(trainer.model, inputs).item()
        assert loss.item() == pytest.approx(trl, rel=1e-5), (loss_type, smoothing)
    assert abs(ours[("sigmoid", 0.0)].item() - log(2)) > 1e-3  # the adapter moved the policy away from the reference


@pytest.mark.parametrize("seed, clamped", [(0, False), (42, True)])  # the adapter's random init: z0 > 0, or 0
def test_kto_equals_trl_kto_trainer(tiny_hf_model, tmp_path, seed, clamped):
    """TRL's KTOTrainer and our KTO objective score the same unpaired batch of the same LoRA model to the same loss,
    given the same mismatched (KL) completions: TRL's own, its batch's completions rotated by one. The rows, three
    desirable to one undesirable, are a file in TRL's unpaired layout read as `dataset=unpaired` reads it."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import KTOConfig, KTOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_model)
    rows = {
        "prompt": ["what is two plus two", "how do i bake bread", "what is two plus two", "list three primary colours"],
        "completion": [" two plus two is four", " the sea is wide and blue", " i can not help", " red yellow and blue"],
        "label": [True, False, True, True],
    }
    path = tmp_path / "unpaired.jsonl"
    path.write_text("".join(json.dumps(dict(zip(rows, row))) + "\n" for row in zip(*rows.values())))
    records = load_examples(method_config("method=kto", "dataset=unpaired", f"dataset.path={path}").dataset, None)
    assert [(r.prompt, r.completion, r.desirable) for r in records] == list(zip(*rows.values()))
    args = KTOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        beta=0.1,
        desirable_weight=1.0,
        undesirable_weight=1.3,
        seed=seed,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
    )
    trainer = KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_hf_model),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )
    inputs = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        trl = trainer.compute_loss(trainer.model, inputs).item()
    policy = trainer.model
    logps, ref, counts = tiny_lora_logps(
        policy, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"]
    )
    kl, ref_kl, kl_counts = tiny_lora_logps(
        policy, inputs["KL_input_ids"], inputs["KL_attention_mask"], inputs["KL_completion_mask"]
    )
    desirable = torch.tensor([r.desirable for r in records])
    assert torch.equal(inputs["label"], desirable)  # TRL's KTO batches are sequential: our rows, in order
    # our objective as PairModule calls it: the rows' completions, then their mismatched ones, and the rows' indices
    cfg = SimpleNamespace(beta=0.1, desirable_weight=1.0, undesirable_weight=1.3)
    ours, logs = kto_objective(cfg, desirable)(
        torch.cat([logps, kl]), torch.cat([counts, kl_counts]), torch.cat([ref, ref_kl]), None, torch.arange(4)
    )
    z0 = kto_reference_point(kl, ref_kl)
    assert logs["kl"] == z0 and (z0.item() == 0) == clamped and ((kl - ref_kl).mean().item() < 0) == clamped
    assert ours.item() == pytest.approx(trl, rel=1e-5)
    assert ours == kto_loss(logps, ref, desirable, z0, beta=0.1, desirable_weight=1.0, undesirable_weight=1.3)


# ---- a few steps of each method on the tiny model ------------------------------------------------------------
def method_config(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


PAIRS = [
    Preference("what is two plus two", "two plus two is four", "i can not help with that request"),
    Preference("how do i bake a loaf of bread at home", "mix flour water salt and yeast", "the sea is wide"),
    Preference("list three primary colours", "red yellow and blue are primary colours", "a spider has eight legs"),
    Preference("what is the capital of france", "the capital of france is paris", "tell me a joke about computers"),
]


class FewSteps:
    """What a method's `train` uses of `Stages`, `fit` being a few full-batch Adam steps over the whole (tiny)
    dataset through the module's own `training_step` at the method's `lr`; the first and last step's losses come
    back as its metrics."""

    def __init__(self, cfg, folder, steps: int = 8):
        self.cfg, self.folder, self.steps = cfg, folder, steps
        self.template = PromptTemplate()

    def examples(self, dataset_cfg, base=None):
        return PAIRS

    def get_or_build(self, kind, build, **inputs):
        folder = self.folder / kind
        folder.mkdir()
        build(folder)
        return folder

    def fit(self, stage, module, data, batch_size, epochs, seed):
        batch = data.collate([data[i] for i in range(len(data))])
        optimizer = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=self.cfg.method.lr)
        losses = []
        for _ in range(self.steps):
            loss = module.training_step(batch, 0)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        return {"first": losses[0], "last": losses[-1]}


@pytest.mark.parametrize(
    "overrides",
    [
        ["method=ipo"],
        ["method=cdpo"],
        ["method=robust_dpo"],
        ["method=simpo"],
        ["method=orpo"],
        ["method=kto"],
        ["method=simnpo"],
        ["method=rmu"],
        ["method=rmu", "method.lora=null"],  # the frozen model is a copy
    ],
    ids=["ipo", "cdpo", "robust_dpo", "simpo", "orpo", "kto", "simnpo", "rmu", "rmu-full"],
)
def test_a_few_steps_of_the_method_reduce_its_loss(overrides, tiny_hf_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safety_lab.stages import Model

    cfg = method_config(*overrides, "model.max_length=64")
    method = build_method(cfg.method.name)
    method.check(cfg.method)
    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_model)
    base = Model(AutoModelForCausalLM.from_pretrained(tiny_hf_model), tokenizer, "tiny")
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer here to log to
        tuned, metrics = method.train(FewSteps(cfg, tmp_path), base, cfg.method, cfg.dataset)
    assert math.isfinite(metrics["first"]) and metrics["last"] < metrics["first"], metrics
    if cfg.method.name in ("simpo", "orpo", "simnpo", "rmu"):  # reference-free: nothing cached
        assert not (tmp_path / "ref_logps").exists()


PAIRS_NEEDED = "preference pairs (prompt, chosen, rejected), e.g. dataset=preferences"


@pytest.mark.parametrize(
    "name, needs",
    [
        ("sft", "examples (prompt, response), e.g. dataset=safety_sft"),
        *((name, PAIRS_NEEDED) for name in ("dpo", "unlearn", "rmu")),
    ],
)
def test_unpaired_data_for_a_method_that_cannot_use_it_is_one_line(name, needs, tmp_path):
    from safety_lab.stages import Model, Stages

    overrides = [f"method={name}", "dataset=unpaired_synthetic", "dataset.n=8"]
    stages = Stages(OmegaConf.create(compose_resolved(overrides, tmp_path)))
    with pytest.raises(SafetyLabError) as info:  # before anything reads the model
        build_method(name).train(stages, Model(None, None, "base"), stages.cfg.method, stages.cfg.dataset)
    message = str(info.value)  # (sft: what else it takes, after `needs`)
    assert message.startswith(f"method={name} needs {needs}") and "\n" not in message
    assert message.endswith("; dataset.view=unpaired gives unpaired preferences (prompt, completion, label)")


# ---- settings out of range -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=cdpo", "method.label_smoothing=0.5"], "method.label_smoothing=0.5: must be in [0, 0.5)"),
        (["method=robust_dpo", "method.label_smoothing=-0.1"], "method.label_smoothing=-0.1: must be in [0, 0.5)"),
        (["method=ipo", "method.beta=0"], "method.beta=0.0: must be > 0"),
        (["method=ipo", "method.beta_rejected=0.01"], "method.beta_rejected: IPO has one regulariser"),
        (["method=simpo", "method.beta=-2"], "method.beta=-2.0: must be > 0"),
        (["method=simpo", "method.gamma_beta_ratio=-0.5"], "method.gamma_beta_ratio=-0.5: must be >= 0"),
        (["method=orpo", "method.odds_ratio_weight=-0.1"], "method.odds_ratio_weight=-0.1: must be >= 0"),
        (["method=kto", "method.undesirable_weight=-1"], "method.undesirable_weight=-1.0: must be >= 0"),
        (
            ["method=kto", "method.desirable_weight=0", "method.undesirable_weight=0"],
            "method.desirable_weight and method.undesirable_weight are both 0",
        ),
        (["method=simnpo", "method.beta=0"], "method.beta=0.0: must be > 0"),
        (["method=simnpo", "method.gamma=-1"], "method.gamma=-1.0: must be >= 0"),
        (["method=rmu", "method.steering_coeff=0"], "method.steering_coeff=0.0: must be > 0"),
        (["method=rmu", "method.retain_weight=-1"], "method.retain_weight=-1.0: must be >= 0"),
        (["method=rmu", "method.layer=-1"], "method.layer=-1: must be >= 0"),
    ],
)
def test_an_objective_setting_out_of_range_is_one_line_before_anything_loads(overrides, message):
    """As `run.run` checks: the ranges (the method's YAML's, the shared table's), then the method's `check`."""
    cfg = method_config(*overrides)
    with pytest.raises(SafetyLabError) as info:
        check_values(cfg.method, "method")
        build_method(cfg.method.name).check(cfg.method)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)


def test_an_rmu_layer_the_model_lacks_is_an_error(tiny_hf_model, tmp_path):
    from transformers import AutoModelForCausalLM

    from safety_lab.methods.rmu import decoder_layer

    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model)
    assert decoder_layer(model, 1) is model.model.layers[1]
    with pytest.raises(SafetyLabError, match=r"method.layer=2: the model has decoder layers 0\.\.1"):
        decoder_layer(model, 2)


def test_the_cli_exits_2_with_one_line(tmp_path):
    """A method's `check` runs in `run.run` after the range tables, still before any model or data loads."""
    weights = ["method.desirable_weight=0", "method.undesirable_weight=0"]
    overrides = ["method=kto", *weights, "dataset=preferences", f"hydra.run.dir={tmp_path}"]
    result = run_safety_lab(*overrides, store=tmp_path / "store")
    assert result.returncode == 2
    errors = [row for row in result.stderr.splitlines() if row.startswith("error: ")]
    assert errors == ["error: method.desirable_weight and method.undesirable_weight are both 0: nothing to learn"]
    assert not (tmp_path / "store").exists() and not (tmp_path / "metrics.json").exists()
