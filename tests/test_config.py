"""Every shipped config composes, resolves and binds to the code it configures; bad values fail early and clearly.

In the spirit of torchtune's config tests and lightning-hydra-template's: no model is loaded. Each experiment and
each option of each config group is composed with Hydra's compose API; then every `_target_` node's keys are bound
to the target's signature (so a misspelled Trainer or logger key fails here, not an hour into a run), and the
plain-dataclass parts (world spec, prompt template, synthetic dataset views and eval suites) are constructed or
looked up. Bad command-line values must fail at composition naming the key, and the real CLI must exit
with 2 and a first stderr line that names the culprit, leaving no `metrics.json` behind.
"""

from __future__ import annotations

import inspect
import re
import shutil
import subprocess
from pathlib import Path

import hydra.utils
import pytest
from helpers import REPO, run_safety_lab
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from safety_lab import methods
from safety_lab.artifacts import recipe_hash
from safety_lab.config import Source, check_values, plain, register
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.sources import checked_suite, load_suites
from safety_lab.stages import Stages
from safety_lab.worlds.synthetic import views
from safety_lab.worlds.synthetic.world import World, WorldSpec

CONF = REPO / "conf"
GROUPS = ("task", "world", "model", "method", "dataset", "eval", "fusion", "trainer", "strategy", "logger")
# options whose config has a mandatory (???) value, and what to give it
REQUIRED = {
    ("model", "hf"): ["model.path=/models/some-model"],
    ("dataset", "jsonl"): ["dataset.path=/data/some-data.jsonl"],
    ("dataset", "unpaired"): ["dataset.path=/data/some-unpaired-data.jsonl"],
}

register()


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def group_cases() -> list[list[str]]:
    cases = [[]]  # the default config
    for group in GROUPS:
        cases += [[f"{group}={name}", *REQUIRED.get((group, name), [])] for name in options(group)]
    cases += [[f"+debug={name}"] for name in options("debug")]
    cases += [[f"+analysis={name}"] for name in options("analysis")]  # optional group: added, not chosen
    cases += [[f"+experiment={name}"] for name in options("experiment")]
    cases += [[f"+experiment={name}", "+debug=fast"] for name in options("experiment")]
    # the harmful fine-tuning grid's groups, which only its experiment adds
    cases += [["+experiment=hft_grid", f"{group}={name}"] for group in ("attack", "defense") for name in options(group)]
    return cases


def compose_resolved(overrides: list[str], output_dir: Path, conf: Path = CONF):
    """The composed config (less `hydra`) as a plain dict, every interpolation resolved as in a real run."""
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose("config", overrides=overrides, return_hydra_config=True)
    cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    try:
        assert OmegaConf.missing_keys(cfg) == set(), "mandatory values left unset"
        return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    finally:
        HydraConfig.instance().cfg = None


def target_nodes(node, key: str = ""):
    """(dotted key, node) of every mapping with a `_target_`, depth first."""
    if isinstance(node, dict):
        if "_target_" in node:
            yield key, node
        for k, v in node.items():
            yield from target_nodes(v, f"{key}.{k}" if key else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from target_nodes(v, f"{key}[{i}]")


def bind_target(node: dict, **runtime_kwargs) -> inspect.BoundArguments:
    """Bind the node's keys (plus what the code passes at instantiation) to its target's signature."""
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    kwargs.update(runtime_kwargs)
    target = node["_target_"]
    try:
        obj = hydra.utils.get_class(target)
    except (ValueError, ImportError):
        obj = hydra.utils.get_method(target)
    signature = inspect.signature(obj)
    bound = signature.bind_partial(**kwargs)
    if obj.__name__ == "WandbLogger":  # its **kwargs go to wandb.init: check them there
        import wandb

        extra = {k: v for k, v in kwargs.items() if k not in signature.parameters}
        inspect.signature(wandb.init).bind_partial(**extra)
    return bound


def check_bindings(container: dict) -> list[str]:
    """Bind every `_target_` of a composed config; returns the dotted keys that were checked."""
    checked = []
    for key, node in target_nodes(container):
        if key == "trainer":  # Stages.fit: instantiate(cfg.trainer, **cfg.strategy, max_epochs=, logger=, ...)
            bind_target(node, **container["strategy"], max_epochs=1, logger=False, default_root_dir="x")
        elif key == "logger":  # Stages.fit: instantiate(cfg.logger, name=stage)
            bind_target(node, name="stage")
        else:
            bind_target(node)
        checked.append(key)
    return checked


@pytest.mark.parametrize("overrides", group_cases(), ids=lambda o: " ".join(o) or "default")
def test_config_composes_and_binds(overrides, tmp_path):
    c = compose_resolved(overrides, tmp_path)
    assert {"world", "model", "method", "dataset", "eval", "trainer", "strategy", "logger", "paths"} <= set(c)
    assert c["paths"]["output_dir"] == str(tmp_path)

    checked = check_bindings(c)
    assert {"trainer", "logger"} <= set(checked)

    WorldSpec(**c["world"])  # its own range checks
    PromptTemplate(**c["model"]["template"])
    if c["dataset"]["source"] == Source.synthetic.value:
        view = views.TRAIN_VIEWS[c["dataset"]["view"]]
        inspect.signature(view).bind(None, c["dataset"]["n"], seed=c["dataset"]["seed"], **c["dataset"]["args"])
    for name, node in c["eval"]["suites"].items():
        suite = checked_suite(name, node)
        if suite.source == Source.synthetic:
            assert (suite.view or name) in views.SUITES
    if c["method"]["name"] != "none":
        assert c["method"]["lr"] > 0 and c["method"]["epochs"] >= 1


def test_every_shipped_config_file_is_composed():
    """A new group or option (say conf/fusion/) must join the cases above, or this fails."""
    composed = {
        (o.lstrip("+").split("=")[0], o.split("=")[1])
        for case in group_cases()
        for o in case
        if "=" in o and "." not in o.split("=")[0]
    }
    always = {"hydra", "paths"}  # one option each, in every composition
    shipped = {(p.parent.name, p.stem) for p in CONF.glob("*/*.yaml") if p.parent.name not in always}
    assert shipped == composed
    assert {("experiment", "quickstart"), ("model", "hf"), ("logger", "wandb")} <= composed
    assert all(len(options(group)) == 1 for group in always)


def test_experiment_and_debug_set_what_they_promise(tmp_path):
    c = compose_resolved(["+experiment=quickstart", "+debug=fast"], tmp_path)
    assert c["name"] == "quickstart"
    assert c["model"]["kind"] == "tiny_llama" and c["method"]["name"] == "sft" and c["method"]["lora"]["r"] == 16
    assert c["dataset"]["n"] == 64 and c["eval"]["n"] == 8 and c["model"]["pretrain"]["n"] == 512
    assert c["trainer"]["enable_checkpointing"] is False


def test_a_new_option_at_its_default_keeps_the_stores_base(tmp_path):
    """The default base's recipe hash is pinned: an option added later (here `model.pretrain.args`) must stay out
    of the recipe at its default, or every existing store pretrains its base again."""
    default = Stages(OmegaConf.create(compose_resolved([], tmp_path))).recipe("base")
    persona = Stages(OmegaConf.create(compose_resolved(["model=tiny_llama_persona"], tmp_path))).recipe("base")
    assert "args" not in default["model"]["pretrain"] and recipe_hash(default) == "8c32b02c218649fd"
    assert persona["model"]["pretrain"]["args"] == {"obey_fraction": 0.2}
    assert {**persona["model"], "pretrain": default["model"]["pretrain"]} == default["model"]


def test_a_suite_added_from_the_command_line_is_checked_like_one_in_yaml(tmp_path):
    c = compose_resolved(["+eval.suites.harmful_obey={view: harmful, prefix: [obey]}"], tmp_path)
    suite = checked_suite("harmful_obey", c["eval"]["suites"]["harmful_obey"])
    assert (suite.view, list(suite.prefix), suite.source, suite.n) == ("harmful", ["obey"], Source.synthetic, None)
    probes = load_suites(OmegaConf.create(c["eval"]), World(WorldSpec()))["harmful_obey"]
    assert len(probes) == c["eval"]["n"] and all(p.prompt.startswith("obey ") and p.unsafe for p in probes)
    with pytest.raises(SafetyLabError, match=r"eval.suites.x: Value 'many'"):
        checked_suite("x", {"view": "harmful", "n": "many"})


def test_store_location_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETY_LAB_STORE", str(tmp_path / "shared_store"))
    c = compose_resolved([], tmp_path)
    assert c["paths"]["artifacts"] == str(tmp_path / "shared_store")
    c = compose_resolved([f"paths.artifacts={tmp_path}/other"], tmp_path)
    assert c["paths"]["artifacts"] == f"{tmp_path}/other"


def test_misspelled_target_key_is_caught_by_binding(tmp_path):
    """`+trainer.max_step=5` composes (the trainer group has no schema) but cannot bind to Trainer."""
    c = compose_resolved(["+trainer.max_step=5"], tmp_path)
    with pytest.raises(TypeError, match="max_step"):
        check_bindings(c)
    c = compose_resolved(["logger=wandb", "+logger.projcet=x"], tmp_path)
    with pytest.raises(TypeError, match="projcet"):
        check_bindings(c)


@pytest.mark.parametrize(
    "override, key, allowed",
    [
        ("method.lr=abc", "method.lr", "Float"),
        ("model.kind=foo", "model.kind", "tiny_llama, hf"),
        ("trainer.foo=1", "trainer.foo", "not in struct"),
        ("world.n_letters=many", "world.n_letters", "Integer"),
        ("model.pretrain.n=1.5", "model.pretrain.n", "Integer"),
        # a method's own settings, typed from its YAML
        ("method=dpo method.beta=abc", "method.beta", "Float"),
        ("method=dpo method.bta=0.2", "method.bta", "not in 'dpo'"),
        ("method=dpo method.logp=max", "method.logp", "expected one of [sum, mean, fixed]"),
        ("method=rmu method.layer=1.5", "method.layer", "Integer"),
        ("method=mask_dpo method.mask.space=sparse", "method.mask.space", "expected one of [dense, factors]"),
        ("method=mask_dpo method.mask.spce=dense", "method.mask.spce", "not in 'mask'"),
        ("method=mask_dpo method.merge=dare", "method.merge", "expected one of [task_arithmetic, ties]"),
        ("method=mask_dpo method.export=all", "method.export", "[none, expected, threshold, sample, topk]"),
    ],
)
def test_bad_value_fails_at_composition_naming_the_key(override, key, allowed):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        with pytest.raises(ConfigCompositionException) as info:
            compose("config", overrides=override.split())
    assert key in str(info.value)
    assert allowed in f"{info.value} {info.value.__cause__}"


TOY_YAML = """\
defaults:
  - schema_toy
  - _self_
name: toy
strength: 0.5  # > 0: a range
rounds: 3      # >= 1
rho: 0.5       # (0, 1): not method=lisa's range of its rho (>= 0)
scale: null    # any value
mode: soft     # soft | hard: a choice
extra:
  norm: l2     # l1 | l2
  eps: 1.0e-6  # [0, 0.1]
"""
TOY_MODULE = """\
from safety_lab.errors import SafetyLabError
from safety_lab.methods import Method, method


@method("toy")
class Toy(Method):
    def check(self, cfg):
        if cfg.mode == "hard" and cfg.rounds > 1:
            raise SafetyLabError(f"method.mode=hard takes one round, not method.rounds={cfg.rounds}")
"""


def test_a_new_method_is_its_module_and_its_yaml(tmp_path, monkeypatch):
    """A method written as a module of safety_lab/methods and a YAML in conf/method, and nothing else: its settings
    are typed, closed and choice-checked at composition from the YAML alone, their ranges (its comments) checked
    wherever the method occurs, and `build_method` finds it."""
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    (conf / "method" / "toy.yaml").write_text(TOY_YAML)
    (tmp_path / "toy.py").write_text(TOY_MODULE)
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    monkeypatch.setitem(methods.METHODS, "toy", None)  # so that the registration is undone afterwards
    register(conf)

    def toy(*overrides: str):
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            return compose("config", overrides=["method=toy", *overrides]).method

    def composed(*overrides: str):
        return OmegaConf.create(compose_resolved(["method=toy", *overrides], tmp_path, conf))

    cfg = plain(toy("method.strength=2", "method.scale=[1, 2]", "method.extra.norm=l1"))
    assert {k: cfg[k] for k in ("name", "strength", "rounds", "scale", "mode", "extra")} == {
        "name": "toy",
        "strength": 2.0,
        "rounds": 3,
        "scale": [1, 2],
        "mode": "soft",
        "extra": {"norm": "l1", "eps": 1e-6},
    }
    assert isinstance(cfg["strength"], float) and cfg["lr"] == 1e-3  # an int taken as a float; MethodConfig's lr
    for override, key, reason in [
        ("method.strength=abc", "method.strength", "Value 'abc' of type 'str' could not be converted to Float"),
        ("method.rounds=1.5", "method.rounds", "Value '1.5' of type 'float' could not be converted to Integer"),
        ("method.strenght=1.0", "method.strenght", "Key 'strenght' not in 'toy'"),
        ("method.mode=medium", "method.mode", "Invalid value 'medium', expected one of [soft, hard]"),
        ("method.extra.norm=l3", "method.extra.norm", "Invalid value 'l3', expected one of [l1, l2]"),
    ]:
        with pytest.raises(ConfigCompositionException) as info:
            toy(override)
        assert key in str(info.value) and str(info.value.__cause__).splitlines()[0] == reason
    with pytest.raises(SafetyLabError, match="^method.mode=hard takes one round, not method.rounds=3$"):
        methods.build_method("toy").check(toy("method.mode=hard"))
    check_values(composed("+method@align.method=lisa", "align.method.rho=0"))  # lisa's rho may be 0, toy's not
    for overrides, message in [
        (["method.strength=0"], "method.strength=0.0: must be > 0"),
        (["method.rounds=0"], "method.rounds=0: must be >= 1"),
        (["method.rho=0"], "method.rho=0.0: must be in (0, 1)"),
        (["method.rho=1"], "method.rho=1.0: must be in (0, 1)"),
        (["method.extra.eps=0.5"], "method.extra.eps=0.5: must be in [0, 0.1]"),
        (["+method@align.method=toy", "align.method.strength=-1"], "align.method.strength=-1.0: must be > 0"),
    ]:
        with pytest.raises(SafetyLabError) as info:
            check_values(composed(*overrides))
        assert str(info.value) == message


# ---- the real command line ------------------------------------------------------------------------------------
HYDRA_HINT = "Set the environment variable HYDRA_FULL_ERROR"
PROGRESS_BAR = re.compile(r"\d+%\|")


LOG_RECORD = re.compile(r"^\[\d\d:\d\d:\d\d (INFO|DEBUG|WARNING) ")


def first_error_line(stderr: str) -> str:
    """The error's first line: stderr's first line that is not blank, a log record, Hydra's HYDRA_FULL_ERROR hint
    or a progress bar redraw."""
    for line in stderr.split("\n"):
        if line.strip() and HYDRA_HINT not in line and not PROGRESS_BAR.search(line) and not LOG_RECORD.match(line):
            return line.strip()
    return ""


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_safety_lab(*overrides, f"hydra.run.dir={tmp_path}/run", store=tmp_path / "store", timeout=300)


def assert_failed_naming(result: subprocess.CompletedProcess, culprit: str, tmp_path: Path) -> None:
    assert result.returncode == 2, result.stdout[-2000:]  # a user's mistake: one line, exit 2 (__main__.py)
    line = first_error_line(result.stderr)
    assert culprit in line, f"first error line {line!r} does not name {culprit!r}; stderr:\n{result.stderr[-3000:]}"
    assert not (tmp_path / "run" / "metrics.json").exists()


@pytest.mark.parametrize(
    "overrides, culprit",
    [
        (["trainer.foo=1"], "trainer.foo"),
        (["method.lr=abc"], "method.lr"),
        (["model.kind=foo"], "model.kind"),
        (["+eval.suites.x={view: harmful, prefx: [obey]}"], "eval.suites.x"),
    ],
)
def test_cli_rejects_bad_config(overrides, culprit, tmp_path):
    assert_failed_naming(run_cli(tmp_path, *overrides), culprit, tmp_path)


def test_cli_rejects_missing_model_path(tmp_path):
    result = run_cli(tmp_path, "model=hf", "model.path=/nonexistent/model", "+debug=fast")
    assert_failed_naming(result, "/nonexistent/model", tmp_path)


def test_cli_rejects_malformed_jsonl_naming_file_and_line(tmp_path, tiny_hf_model):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"prompt": "hello", "response": "hi"}\n{"prompt": "broken", "response": }\n'
        '{"prompt": "fine", "response": "ok"}\n'
    )
    result = run_cli(
        tmp_path,
        "model=hf",
        f"model.path={tiny_hf_model}",
        "method=sft",
        "dataset=jsonl",
        f"dataset.path={bad}",
        "eval.base=false",
        "+debug=fast",
    )
    assert_failed_naming(result, "bad.jsonl:2", tmp_path)
    assert not list((tmp_path / "store").glob("*/.tmp-*")), "a failed build left a temporary folder"
