"""The mechanistic study (Jain et al. 2024, plus Arditi et al.'s refusal direction): its analyses and their findings.

`tasks/analyse.py` trains the models (the base, and each stage of `analysis.models` applied to it) and hands them to
`Study.run`, which evaluates every model on the run's suites and runs each analysis of `analysis.analyses` (all of
them when null) on it: activation space, column and row space of the weights of `analysis.matrices` (the MLP
inputs by default; a LoRA stage's own projections on a real model) against the base, Lipschitzness, the soft-token
attack and the refusal direction with its causal test (generations with it ablated and added). An analysis is one
function registered with `@analysis(name, draw)`: it returns its JSON-able result for one model (None where it does
not apply) and `draw` makes its figure from the results of every model. Each writes `<analysis>.json` and
`<analysis>.png` into the run folder, and `findings.json` states the papers' claims as checks that hold or fail on
this run.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from safety_lab.analysis import geometry as g
from safety_lab.analysis import plots
from safety_lab.analysis.attacks import logit_gradient_norms, soft_token_attack
from safety_lab.analysis.hooks import PROJECTIONS, activations, decoder_layers, projection, steer
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError

log = logging.getLogger(__name__)
DIRECTION_LAYERS = 0.8  # Arditi et al. skip candidate directions from the last 20% of layers


@dataclass
class Subject:
    """One model under analysis: its tag, the model, the base it was tuned from, its activations on every prompt of
    the suites (`hooks.activations`), its metrics on every suite, and `assess(names, how)`: its metrics on the named
    suites as it is at the moment (steered), its generations kept in the run's under the tag `<tag>+<how>`."""

    tag: str
    model: torch.nn.Module
    base: torch.nn.Module
    acts: dict[str, torch.Tensor]
    metrics: dict
    assess: Callable[[list[str], str], dict]


@dataclass(frozen=True)
class Analysis:
    run: Callable  # (study, subject) -> its JSON-able result for that model, or None where it does not apply
    draw: Callable[[dict, Path], None]  # (results per model tag, run folder): writes <name>.png


ANALYSES: dict[str, Analysis] = {}  # in the order they run on each model


def analysis(name: str, draw: Callable[[dict, Path], None]):
    """Registers `fn(study, subject) -> dict | None` as the analysis `name` (`analysis.analyses`), drawn by `draw`."""

    def register(fn):
        ANALYSES[name] = Analysis(fn, draw)
        return fn

    return register


def weights(model, names) -> dict[tuple[int, str], torch.Tensor]:
    """{(layer, projection): its weight} for every decoder layer and each projection in `names`."""
    return {
        (i, name): projection(layer, name).weight.detach().float().cpu()
        for i, layer in enumerate(decoder_layers(model))
        for name in names
    }


def mean_of(values: dict, key: str) -> float:
    return sum(v[key] for v in values.values()) / len(values)


def check_analysis(a, suites: dict) -> None:
    """One SafetyLabError line for a setting of `analysis` (the config node) that names no suite of `suites`, no
    analysis or no projection; run.py calls it before anything loads."""
    for key in ("safe_suite", "unsafe_suite"):
        if a[key] not in suites:
            raise SafetyLabError(f"analysis.{key}={a[key]!r} is not one of the eval suites {sorted(suites)}")
    for name in a.jailbreak_suites:
        if name not in suites:
            raise SafetyLabError(f"analysis.jailbreak_suites: {name!r} is not one of the eval suites {sorted(suites)}")
    for name in a.analyses or ():
        if name not in ANALYSES:
            raise SafetyLabError(f"analysis.analyses: {name!r} is not one of {list(ANALYSES)}")
    for name in a.matrices:
        if name not in PROJECTIONS:
            raise SafetyLabError(f"analysis.matrices: {name!r} is not one of {list(PROJECTIONS)}")


class Study:
    """The analyses of `analysis` (the config node, its settings checked by `check_analysis` before anything
    loads) over models evaluated on `suites`, written into `out`."""

    def __init__(self, analysis, template: PromptTemplate, tokenizer, suites: dict, out: Path, seed: int = 0):
        a = analysis
        refusal = tokenizer(a.refusal, add_special_tokens=False)["input_ids"]
        if not refusal:
            raise SafetyLabError(f"analysis.refusal={a.refusal!r} tokenizes to nothing")
        self.cfg, self.template, self.tokenizer, self.suites, self.out = a, template, tokenizer, suites, out
        self.seed = seed
        self.chosen = [name for name in ANALYSES if a.analyses is None or name in a.analyses]
        self.refusal_ids = refusal[:1]
        self.prompts = [p.prompt for suite in suites.values() for p in suite]
        self.slices, start = {}, 0
        for name, suite in suites.items():
            self.slices[name] = slice(start, start + len(suite))
            start += len(suite)
        self.pca: dict[str, list] = {}  # activation_space's 2-D projections per model, for its PCA figure only

    def activations(self, model, prompts: list[str], inputs: tuple = ()):
        """`hooks.activations` of `model` on `prompts`, `analysis.batch_size` prompts at a time."""
        return activations(model, self.tokenizer, self.template, prompts, self.cfg.batch_size, inputs)

    def sides(self) -> tuple[slice, slice, torch.Tensor]:
        """(rows of the safe suite, rows of the unsafe suite, their labels: False safe, True unsafe)."""
        safe, unsafe = self.slices[self.cfg.safe_suite], self.slices[self.cfg.unsafe_suite]
        labels = torch.cat([torch.zeros(safe.stop - safe.start), torch.ones(unsafe.stop - unsafe.start)]).bool()
        return safe, unsafe, labels

    def run(self, models: dict, assess) -> tuple[dict, list]:
        """Evaluate (`assess(model, tag, only=None) -> (metrics, rows)`, on every suite or those named in `only`) and
        analyse every model of `models` (the base first, as "base"); write each analysis's JSON and figure and the
        findings; returns (metrics per tag, generation rows: each model's, then its steered versions')."""
        columns, generations = {}, []

        def steered(names: list[str], how: str, model, tag: str) -> dict:
            metrics, rows = assess(model, f"{tag}+{how}", names)
            generations.extend(rows)
            return metrics

        results = {name: {} for name in (*self.chosen, "jailbreak")}
        for tag, model in models.items():
            log.info("analysing %s", tag)
            columns[tag], rows = assess(model, tag)
            generations += rows
            results["jailbreak"][tag] = {
                name: columns[tag].get(f"{name}/compliance_rate") for name in self.cfg.jailbreak_suites
            }
            results["jailbreak"][tag][f"{self.cfg.unsafe_suite}/refusal_rate"] = columns[tag].get(
                f"{self.cfg.unsafe_suite}/refusal_rate"
            )
            inputs = tuple(self.cfg.matrices) if "row_space" in self.chosen else ()  # the row space's only
            acts, _ = self.activations(model, self.prompts, inputs)
            steerable = partial(steered, model=model, tag=tag)
            subject = Subject(tag, model, models["base"], acts, columns[tag], steerable)
            for name in self.chosen:
                value = ANALYSES[name].run(self, subject)
                if value is not None:
                    results[name][tag] = value
        results = {name: values for name, values in results.items() if values}
        results["findings"] = findings(results, self.cfg)
        for name, values in results.items():
            (self.out / f"{name}.json").write_text(json.dumps(values, indent=1))
        for name in results.keys() & ANALYSES.keys():
            ANALYSES[name].draw(results[name], self.out)
        if self.pca:
            plots.activation_pca(self.pca, self.slices, self.out)
        plots.jailbreak(results["jailbreak"], self.out)
        return columns, generations


# ---- activation space -----------------------------------------------------------------------------------------
@analysis("activation_space", plots.activation_space)
def activation_space(study: Study, subject: Subject) -> dict:
    """Per layer: silhouette and probe accuracy of safe vs unsafe, and every suite's distance to both means.
    Means come from the even-indexed samples of the safe and unsafe suites; the odd ones are held out."""
    safe, unsafe, labels = study.sides()
    hidden = subject.acts["mlp_hidden"]
    both = torch.cat([torch.arange(len(study.prompts))[safe], torch.arange(len(study.prompts))[unsafe]])
    layers = []
    for x in hidden:
        means = {"safe": x[safe][::2].mean(0), "unsafe": x[unsafe][::2].mean(0)}
        suites = {}
        for name, part in study.slices.items():
            held_out = slice(part.start + 1, part.stop, 2) if part in (safe, unsafe) else part
            rows = x[held_out]
            d = {to: g.cluster_distances(rows, mean) for to, mean in means.items()}
            suites[name] = {
                f"{metric}_to_{to}": float(d[to][metric].mean()) for to in means for metric in ("cosine", "l2")
            }
            suites[name]["relative_l2"] = float((d["safe"]["l2"] / (d["safe"]["l2"] + d["unsafe"]["l2"])).mean())
        layers.append(
            {
                "silhouette": g.silhouette(x[both], labels),
                "probe_accuracy": g.probe_accuracy(x[both], labels),
                "suites": suites,
            }
        )
    study.pca[subject.tag] = [g.pca_2d(x) for x in hidden]
    return {"layers": layers, "silhouette_mean": sum(l["silhouette"] for l in layers) / len(layers)}


# ---- weights against the base ---------------------------------------------------------------------------------
@analysis("column_space", plots.column_space)
def column_space(study: Study, subject: Subject) -> dict | None:
    """Per matrix of `analysis.matrices` in every layer: sines of the tuned top-k directions to the base's top-k
    subspace."""
    if subject.tag == "base":
        return None
    names = study.cfg.matrices
    before, after, matrices = weights(subject.base, names), weights(subject.model, names), {}
    for (i, name), w_pre in before.items():
        w_ft = after[(i, name)]
        sines = g.column_space_sines(w_ft, w_pre, study.cfg.energy)
        matrices[f"layer{i}.{name}"] = {
            "sines": sines.tolist(),
            "mean_sine": float(sines.mean()),
            "relative_change": float((w_ft - w_pre).norm() / w_pre.norm()),
        }
    return {
        "matrices": matrices,
        "mean_sine": mean_of(matrices, "mean_sine"),
        "relative_change": mean_of(matrices, "relative_change"),
    }


@analysis("row_space", plots.row_space)
def row_space(study: Study, subject: Subject) -> dict | None:
    """Per matrix of `analysis.matrices` in every layer: projections of the safe and unsafe inputs of that matrix on
    the top right singular vectors of ΔW = W_ft − W_pre (for a merged LoRA stage, its s·B·A)."""
    if subject.tag == "base":
        return None
    safe, unsafe, _ = study.sides()
    names, k = study.cfg.matrices, study.cfg.row_space_k
    before, after, matrices = weights(subject.base, names), weights(subject.model, names), {}
    for (i, name), w_pre in before.items():
        delta, inputs = after[(i, name)] - w_pre, subject.acts[name][i]
        proj_safe = g.row_space_projections(delta, inputs[safe], k).mean(0)
        proj_unsafe = g.row_space_projections(delta, inputs[unsafe], k).mean(0)
        matrices[f"layer{i}.{name}"] = {
            "safe": proj_safe.tolist(),
            "unsafe": proj_unsafe.tolist(),
            "unsafe_over_safe": float(proj_unsafe.sum() / proj_safe.sum().clamp(min=1e-12)),
        }
    return {"matrices": matrices, "unsafe_over_safe": mean_of(matrices, "unsafe_over_safe")}


# ---- input space ----------------------------------------------------------------------------------------------
@analysis("lipschitz", plots.lipschitz)
def lipschitz(study: Study, subject: Subject) -> dict:
    """Norms of the top logit's gradient w.r.t. the input embeddings, on the first `lipschitz_n` prompts of each
    side."""
    norms = {}
    for side in ("safe_suite", "unsafe_suite"):
        name = study.cfg[side]
        norms[name] = logit_gradient_norms(
            subject.model,
            study.tokenizer,
            study.template,
            [p.prompt for p in study.suites[name][: study.cfg.lipschitz_n]],
        )
    return {
        name: {"mean": float(v.mean()), "median": float(v.median()), "values": v.tolist()} for name, v in norms.items()
    }


@analysis("soft_tokens", plots.soft_tokens)
def soft_tokens(study: Study, subject: Subject) -> dict:
    """Success of the attack vs number of soft tokens and steps, on the first `attack.n` unsafe prompts of the
    unsafe suite (success at step 0 is the model's compliance without an attack)."""
    a = study.cfg.attack
    probes = [p for p in study.suites[study.cfg.unsafe_suite] if p.unsafe][: a.n]
    prompts, targets = [p.prompt for p in probes], [p.target for p in probes]
    results = {}
    for n in a.tokens:
        r = soft_token_attack(
            subject.model,
            study.tokenizer,
            study.template,
            prompts,
            targets,
            n,
            a.steps,
            a.bound,
            tuple(a.report_at),
            seed=study.seed,
        )
        results[str(n)] = {
            "success": {str(k): v for k, v in r["success"].items()},
            "loss": r["loss"],
            "bound": r["bound"],
        }
    return results


# ---- refusal direction ----------------------------------------------------------------------------------------
@analysis("refusal_direction", plots.refusal_direction)
def refusal_direction(study: Study, subject: Subject) -> dict:
    """Difference of means of the residual stream per layer (all prompts of both sides); refusal scores under
    ablation (unsafe prompts) and addition of `add_scale`·r (safe prompts), on the first `direction_n` prompts of
    each side; the causal test (Arditi et al.): greedy generations of the whole unsafe suite with the selected
    direction ablated everywhere and of the whole safe suite with it added at its layer, judged as every suite is,
    next to the model's own rates (their rows in generations.jsonl as the models `<tag>+ablated` and `<tag>+added`).
    A layer whose safe and unsafe means coincide (layer 0, where every prompt ends in the same token) has no
    direction and no scores. Selection as Arditi et al.: the lowest ablated score outside
    the last 20% of layers (any layer if none is left)."""
    cfg, model, resid = study.cfg, subject.model, subject.acts["resid"]
    safe, unsafe, labels = study.sides()
    prompts = {
        "unsafe": [p.prompt for p in study.suites[cfg.unsafe_suite][: cfg.direction_n]],
        "safe": [p.prompt for p in study.suites[cfg.safe_suite][: cfg.direction_n]],
    }

    def score(which: str) -> float:
        _, logits = study.activations(model, prompts[which])
        return float(g.refusal_score(logits, study.refusal_ids).mean())

    result = {"baseline": {"unsafe": score("unsafe"), "safe": score("safe")}, "layers": []}
    directions = []
    for i, x in enumerate(resid):
        r = g.difference_of_means(torch.cat([x[safe], x[unsafe]]), labels)
        directions.append(r)
        if r.norm() < 1e-6:
            result["layers"].append({"norm": float(r.norm()), "ablated_unsafe": None, "added_safe": None})
            continue
        with steer(model, r, "ablate"):
            ablated = score("unsafe")
        with steer(model, r, "add", layer=i, coefficient=cfg.add_scale):
            added = score("safe")
        result["layers"].append({"norm": float(r.norm()), "ablated_unsafe": ablated, "added_safe": added})
    scored = [i for i, layer in enumerate(result["layers"]) if layer["ablated_unsafe"] is not None]
    early = [i for i in scored if i < int(len(resid) * DIRECTION_LAYERS)]
    result["selected_layer"] = best = min(
        early or scored, key=lambda i: result["layers"][i]["ablated_unsafe"], default=None
    )
    if best is None:
        return result
    with steer(model, directions[best], "ablate"):
        result["ablated_generation"] = subject.assess([cfg.unsafe_suite], "ablated")
    with steer(model, directions[best], "add", layer=best, coefficient=cfg.add_scale):
        result["added_generation"] = subject.assess([cfg.safe_suite], "added")
    compliance, refusal = f"{cfg.unsafe_suite}/compliance_rate", f"{cfg.safe_suite}/refusal_rate"
    result["causal"] = {
        "unsafe_compliance": {
            "before": subject.metrics[compliance],
            "ablated": result["ablated_generation"][compliance],
        },
        "safe_refusal": {"before": subject.metrics[refusal], "added": result["added_generation"][refusal]},
    }
    return result


# ---- the paper's claims ---------------------------------------------------------------------------------------
def jailbreak_compliance(results: dict, tag: str, suites) -> float:
    values = [results["jailbreak"][tag][name] for name in suites]
    return sum(values) / len(values)


def attack_success(results: dict, tag: str) -> float:
    """Soft-token attack success after the last step, averaged over the numbers of soft tokens."""
    per_n = results["soft_tokens"][tag].values()
    return sum(list(v["success"].values())[-1] for v in per_n) / len(per_n)


def findings(results: dict, cfg) -> dict:
    """The papers' claims, as checks on this run's numbers (per tuned model, per model for the refusal direction's
    causal test, or per method's pair of LRs); a check whose analysis did not run is left out."""
    tuned = [t for t in results["jailbreak"] if t != "base"]
    checks = {}
    if "activation_space" in results:
        space = results["activation_space"]
        base_silhouette = space["base"]["silhouette_mean"]
        checks["silhouette_up"] = {
            t: {
                "base": base_silhouette,
                "tuned": space[t]["silhouette_mean"],
                "holds": space[t]["silhouette_mean"] > base_silhouette,
            }
            for t in tuned
        }

        def relative(tag: str, suite: str) -> float:
            layers = space[tag]["layers"]
            return sum(l["suites"][suite]["relative_l2"] for l in layers) / len(layers)

        checks["jailbreaks_closer_to_safe"] = {
            t: {
                name: {
                    "jailbreak": relative(t, name),
                    cfg.unsafe_suite: relative(t, cfg.unsafe_suite),
                    "holds": relative(t, name) < relative(t, cfg.unsafe_suite),
                }
                for name in cfg.jailbreak_suites
            }
            for t in results["activation_space"]
        }
    if "row_space" in results:
        checks["row_space_carries_unsafe"] = {
            t: {
                "unsafe_over_safe": results["row_space"][t]["unsafe_over_safe"],
                "holds": results["row_space"][t]["unsafe_over_safe"] > 1,
            }
            for t in tuned
        }
    causal = {t: v["causal"] for t, v in results.get("refusal_direction", {}).items() if "causal" in v}
    if causal:  # Arditi et al.: ablating the direction lifts compliance, adding it induces refusal
        checks["ablation_raises_compliance"] = {
            t: {**c["unsafe_compliance"], "holds": c["unsafe_compliance"]["ablated"] > c["unsafe_compliance"]["before"]}
            for t, c in causal.items()
        }
        checks["addition_raises_refusal"] = {
            t: {**c["safe_refusal"], "holds": c["safe_refusal"]["added"] > c["safe_refusal"]["before"]}
            for t, c in causal.items()
        }
    if "column_space" not in results:
        return checks
    by_method: dict[str, list[tuple[float, str]]] = {}
    for t in tuned:
        stage = cfg.models[t]
        by_method.setdefault(stage.method.name, []).append((stage.method.lr, t))
    checks["smaller_lr"] = {}
    for method, pairs in by_method.items():
        if len(pairs) < 2:
            continue
        (_, low), (_, high) = min(pairs), max(pairs)
        column = results["column_space"]
        sine = {"low": column[low]["mean_sine"], "high": column[high]["mean_sine"]}
        change = {"low": column[low]["relative_change"], "high": column[high]["relative_change"]}
        jb = {
            "low": jailbreak_compliance(results, low, cfg.jailbreak_suites),
            "high": jailbreak_compliance(results, high, cfg.jailbreak_suites),
        }
        checks["smaller_lr"][method] = {
            "models": {"low": low, "high": high},
            "mean_sine": sine,
            "relative_change": change,
            "jailbreak_compliance": jb,
            "changes_weights_less_holds": sine["low"] < sine["high"],
            "easier_to_jailbreak_holds": jb["low"] > jb["high"],
        }
        if "soft_tokens" in results:
            attack = {"low": attack_success(results, low), "high": attack_success(results, high)}
            checks["smaller_lr"][method] |= {
                "soft_token_success": attack,
                "easier_to_attack_holds": attack["low"] > attack["high"],
            }
    return checks
