"""Runs that refuse garbage: numeric settings outside their range are one line before anything loads, a diverging
fit stops with the stage, step and loss named and publishes nothing, and each process's thread count follows from
how the job is launched."""

from __future__ import annotations

import pytest
from conftest import build_tiny_llama, build_tiny_tokenizer
from helpers import fit_config, run_safety_lab
from omegaconf import OmegaConf
from test_config import compose_resolved

from safety_lab.config import check_values
from safety_lab.data.collate import TokenizedExamples
from safety_lab.data.records import Example
from safety_lab.distributed import job_threads
from safety_lab.errors import SafetyLabError
from safety_lab.methods.sft import SFTModule
from safety_lab.stages import Stages


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.lr=-1e-3", "method.lr=-0.001: must be > 0"),
        ("method.lr=nan", "method.lr=nan: must be a finite number"),
        ("method.lr=0", "method.lr=0.0: must be > 0"),
        ("method.epochs=-1", "method.epochs=-1: must be >= 1"),
        ("eval.n=0", "eval.n=0: must be >= 1"),
        ("method.warmup_ratio=1.5", "method.warmup_ratio=1.5: must be in [0, 1]"),
        ("method.lora.dropout=-0.1", "method.lora.dropout=-0.1: must be in [0, 1]"),
        ("model.pretrain.lr=inf", "model.pretrain.lr=inf: must be a finite number"),
        ("+experiment=lora_fusion", None),
        ("+experiment=realign", None),
    ],
)
def test_numeric_settings_outside_their_range_are_named(override, message, tmp_path):
    cfg = OmegaConf.create(compose_resolved([override], tmp_path))
    if message is None:  # the shipped studies pass
        check_values(cfg)
        return
    with pytest.raises(SafetyLabError) as info:
        check_values(cfg)
    assert str(info.value) == message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method=cdpo", "method.beta_rejected=abc"], "method.beta_rejected='abc': must be a number > 0"),
        (["method=unlearn", "method.clamp=0"], "method.clamp=0: must be > 0"),
        (["method=dpo", "method.logp=fixed", "method.fixed_length=0"], "method.fixed_length=0: must be >= 1"),
    ],
)
def test_a_method_setting_with_a_null_default_is_checked_by_its_range(overrides, message, tmp_path):
    """A null default types a setting `Any` in the YAML's schema, so its range (and being a number) is checked here."""
    with pytest.raises(SafetyLabError) as info:
        check_values(OmegaConf.create(compose_resolved(overrides, tmp_path)))
    assert str(info.value) == message


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["+experiment=realign", "method.tasks.obey.method.lr=-1"], "method.tasks.obey.method.lr=-1.0: must be > 0"),
        (  # a method's own range (conf/method/mask_dpo.yaml), in the defense's method slot
            ["+experiment=hft_grid", "defense=mask_dpo", "defense.method.top_k=2"],
            "defense.method.top_k=2.0: must be in (0, 1]",
        ),
    ],
)
def test_a_stage_nested_in_a_study_is_checked_too(overrides, message, tmp_path):
    with pytest.raises(SafetyLabError) as info:
        check_values(OmegaConf.create(compose_resolved(overrides, tmp_path)))
    assert str(info.value) == message


def test_cli_refuses_a_negative_learning_rate_before_anything_loads(tmp_path):
    result = run_safety_lab("+experiment=quickstart", "+debug=fast", "method.lr=-1e-3", store=tmp_path / "store")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "error: method.lr=-0.001: must be > 0"
    assert not (tmp_path / "store").exists()


def test_a_diverging_fit_stops_naming_stage_step_and_loss_and_publishes_nothing(tmp_path):
    tokenizer = build_tiny_tokenizer()
    cfg = OmegaConf.create(fit_config(tmp_path))
    stages = Stages(cfg)
    data = TokenizedExamples([Example("a b", "c d")] * 32, tokenizer, max_length=16)

    def build(folder):  # no warm-up, no clipping would help: lr 1e12 overflows within a few steps
        stages.fit("sft", SFTModule(build_tiny_llama(len(tokenizer)), lr=1e12, warmup_ratio=0.0), data, 4, 3, 0)

    with pytest.raises(
        SafetyLabError,
        match=r"^sft: (the loss \(nan\)|the loss \(inf\)|a gradient) is not finite "
        r"at step \d+ \(last logged loss .*\); lower the learning rate$",
    ):
        stages.store.get_or_build("adapter", {}, build)
    assert not list((tmp_path / "store").rglob("manifest.json"))
    assert not list((tmp_path / "store" / "adapter").glob(".tmp-*"))


@pytest.mark.parametrize(
    "overrides, cores, expected",
    [
        ({}, 2, 2),
        ({"threads": 3}, 2, 3),
        ({"strategy": {"devices": 2}}, 2, 1),
        ({"strategy": {"devices": 2}}, 16, 8),
    ],
)
def test_threads_follow_the_launch(overrides, cores, expected, monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(cores)))
    cfg = OmegaConf.merge({"threads": None, "strategy": {"devices": 1}, "trainer": {"accelerator": "cpu"}}, overrides)
    assert job_threads(cfg) == expected
