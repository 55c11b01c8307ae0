"""Turn `dataset` and `eval.suites` configs into records, from the synthetic world or from files / hub datasets.

It sits above both kinds of source, so imports run one way: `sources` → `data`, `worlds`; `worlds` → `data.records`;
`data` imports neither.
"""

from __future__ import annotations

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from safety_lab.config import DatasetConfig, MixConfig, Source, SuiteConfig, plain
from safety_lab.data import io
from safety_lab.data.adapters import load_rows
from safety_lab.data.records import Probe
from safety_lab.errors import SafetyLabError
from safety_lab.worlds.synthetic import views
from safety_lab.worlds.synthetic.world import World


def load_examples(cfg, world: World) -> list:
    """Training records (`Example`s, `Preference`s or `UnpairedPreference`s, by the view or the file's layout) for a
    `dataset` config."""
    if cfg.source == Source.synthetic:
        if cfg.view not in views.TRAIN_VIEWS:
            raise SafetyLabError(f"dataset.view={cfg.view!r} is not one of {sorted(views.TRAIN_VIEWS)}")
        return views.TRAIN_VIEWS[cfg.view](world, cfg.n, seed=cfg.seed, **cfg.args)
    if cfg.preferences and cfg.label_key:
        raise SafetyLabError(
            f"dataset.preferences=true and dataset.label_key={cfg.label_key!r}: a file holds preference pairs or "
            "unpaired rows, not both"
        )
    rows = load_rows(_required(cfg.path, "dataset.path"), cfg.split, cfg.adapter, cfg.args, source="dataset")
    if cfg.label_key:  # cut to n first: the rows kept must hold both labels (exports often list one kind first)
        kept = rows[: cfg.n] if cfg.n else rows
        where = cfg.path if len(kept) == len(rows) else f"{cfg.path} (its first dataset.n={cfg.n} rows)"
        return io.to_unpaired(kept, cfg.prompt_key, cfg.response_key, cfg.label_key, source=where)
    if cfg.preferences:
        examples = io.to_preferences(rows, cfg.prompt_key, source=cfg.path)
    else:
        examples = io.to_examples(rows, cfg.prompt_key, cfg.response_key, source=cfg.path)
    return examples[: cfg.n] if cfg.n else examples


def checked_mix(cfg) -> dict:
    """`dataset.mix` checked before anything loads: each entry against MixConfig and its dataset against
    DatasetConfig ({name: (fraction, dataset config)}), the fractions summing to less than 1."""
    mix = {}
    for name, node in (cfg.get("mix") or {}).items():
        try:
            entry = OmegaConf.merge(OmegaConf.structured(MixConfig), node)
            mix[name] = entry.fraction, OmegaConf.merge(OmegaConf.structured(DatasetConfig), entry.dataset or {})
        except OmegaConfBaseException as e:
            raise SafetyLabError(f"dataset.mix.{name}: {str(e).splitlines()[0]}") from e
    total = sum(fraction for fraction, _ in mix.values())
    if total >= 1:
        raise SafetyLabError(f"dataset.mix: the fractions sum to {total:g}; they must sum to less than 1")
    return mix


def mix_parts(cfg, n_user: int) -> dict:
    """Each `dataset.mix` entry's dataset config with its `n` set to the records it adds: round(f·n/(1 − Σf)) for
    `fraction` f, so that it makes f of the user's n records plus every entry's."""
    mix = checked_mix(cfg)
    total = sum(fraction for fraction, _ in mix.values())
    for fraction, dataset in mix.values():
        dataset.n = round(fraction * n_user / (1 - total))
    return {name: dataset for name, (_, dataset) in mix.items()}


def load_prompts(cfg) -> list[str]:
    """The prompts of a file `dataset` config, without responses (its `n` first): harmful prompts to generate
    on-policy answers for, such as the train splits of the standard prompt sets (conf/dataset/harmbench_train)."""
    if cfg.source == Source.synthetic:
        raise SafetyLabError("load_prompts reads file datasets; a synthetic view makes its own records")
    rows = load_rows(_required(cfg.path, "dataset.path"), cfg.split, cfg.adapter, cfg.args, source="dataset")
    prompts = [probe.prompt for probe in io.to_probes(rows, cfg.prompt_key, unsafe=True, source=cfg.path)]
    return prompts[: cfg.n] if cfg.n else prompts


def checked_suite(name: str, node):
    """`eval.suites.<name>` checked against SuiteConfig. Suites are typed loosely in the schema because OmegaConf
    cannot add a typed entry from the command line (`'+eval.suites.x={view: harmful, prefix: [obey]}'`). Resolved
    first: the typed copy has no root for `${paths.root}` to refer to."""
    try:
        return OmegaConf.merge(OmegaConf.structured(SuiteConfig), plain(node))
    except OmegaConfBaseException as e:
        raise SafetyLabError(f"eval.suites.{name}: {str(e).splitlines()[0]}") from e


def load_suites(cfg, world: World) -> dict[str, list[Probe]]:
    suites = {}
    for name, node in cfg.suites.items():
        suite = checked_suite(name, node)
        n = suite.n or cfg.n
        if suite.source == Source.synthetic:
            if suite.opening is not None:
                raise SafetyLabError(
                    f"eval.suites.{name}.opening: only file suites take one (synthetic probes have targets)"
                )
            try:
                suites[name] = views.suite(world, suite.view or name, n, suite.seed, suite.lang, tuple(suite.prefix))
            except ValueError as e:
                raise SafetyLabError(f"eval.suites.{name}: {e}") from e
        else:
            if (suite.unsafe is None) == (suite.unsafe_key is None):
                raise SafetyLabError(f"eval.suites.{name}: set exactly one of unsafe= or unsafe_key=")
            rows = load_rows(
                _required(suite.path, f"eval.suites.{name}.path"),
                suite.split,
                suite.adapter,
                suite.args,
                source=f"eval.suites.{name}",
            )
            suites[name] = io.to_probes(
                rows, suite.prompt_key, suite.unsafe, suite.unsafe_key, suite.path, suite.opening
            )[:n]
    return suites


def _required(value, key: str):
    if not value:
        raise SafetyLabError(f"{key} is required for a file dataset")
    return value
