"""Judge a finished run again, with another judge, from the answers it already generated:

    python -m safety_lab.rejudge RUN_DIR judge=llm judge_args.base_url=https://.../v1 judge_args.model=<name>
    python -m safety_lab.rejudge RUN_DIR judge=keyword judge_args.keywords=gcg name=keyword_gcg by=type

Every `generations.jsonl` under RUN_DIR (a run folder, or a sweep's job and `weight=<λ>/` folders) is read back into
its probes (prompt, unsafe, target and the probe's fields, `meta`) and answers, judged as a whole, and the verdicts
are written beside it: `judgements_<name>.jsonl` (one line per generation, in its order) and `metrics_<name>.json`
(the keys of `metrics.json` as this judge sees them: the run's own column unprefixed, the others as `<tag>.`; `by=`
adds `<suite>:<value>/<metric>` for each value of those probe fields, e.g. XSTest's `type` or Do-Not-Answer's
`risk_area`). `name` defaults to the judge's name. A judge that keeps a judgement cache (the LLM judges) uses
`RUN_DIR/judgement_cache.sqlite` unless given `judge_args.cache=`, so an interrupted re-judge resumes where it
stopped and a repeated one asks nothing again. Arguments may be written as on the run's command line
(`eval.judge=llm`, `+eval.judge_args.model=...`).

`python -m safety_lab.report RUN_DIR` then shows, for every pair of judges of the same generations, both judges'
rates and their agreement, Cohen's kappa (`agreement`). Bad inputs (no such folder, no generations.jsonl under it, a
malformed row, an unknown judge, argument or field) are one `error:` line and exit 2, with nothing written.
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from safety_lab.artifacts import write_json_atomic
from safety_lab.data.io import read_jsonl
from safety_lab.data.records import Probe
from safety_lab.errors import SafetyLabError
from safety_lab.eval.judges import Judge, Judgement, judge_class
from safety_lab.eval.metrics import breakdown, cohens_kappa, suite_metrics

GENERATIONS = "generations.jsonl"
SETTINGS = ("judge", "judge_args", "name", "by")
VERDICTS = ("refused", "complied")
USAGE = (
    "usage: python -m safety_lab.rejudge RUN_DIR judge=<name> [judge_args.<key>=<value> ...] [name=<label>] "
    "[by=<field>[,<field>]]"
)


def settings(overrides: list[str]) -> dict:
    """`key=value` arguments (an `eval.` prefix and a leading `+` are dropped) → {judge, judge_args, name, by}."""
    cleaned = [o.lstrip("+").removeprefix("eval.") for o in overrides]
    bad = [o for o in cleaned if "=" not in o or o.split("=", 1)[0].split(".")[0] not in SETTINGS]
    if bad:
        raise SafetyLabError(f"rejudge: {bad[0]!r} is not one of {', '.join(k + '=' for k in SETTINGS)} ({USAGE})")
    try:
        given = OmegaConf.to_container(OmegaConf.from_dotlist(cleaned))
    except OmegaConfBaseException as e:
        raise SafetyLabError(f"rejudge: {str(e).splitlines()[0]}") from None
    if not isinstance(given.get("judge"), str):
        raise SafetyLabError(f"rejudge: which judge? ({USAGE})")
    by = given.get("by") or []
    name = str(given.get("name") or given["judge"])
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise SafetyLabError(f"rejudge: name={name!r} must be letters, digits, '_', '.' or '-' (it names files)")
    return {
        "judge": given["judge"],
        "judge_args": dict(given.get("judge_args") or {}),
        "name": name,
        "by": by.split(",") if isinstance(by, str) else [str(b) for b in by],
    }


def generation_files(root: Path) -> list[Path]:
    if not root.is_dir():
        raise SafetyLabError(f"rejudge: {root} " + ("is not a folder" if root.exists() else "does not exist"))
    files = sorted(
        p for p in root.rglob(GENERATIONS) if not any(part.startswith(".") for part in p.relative_to(root).parts)
    )
    if not files:
        raise SafetyLabError(f"rejudge: no {GENERATIONS} in {root} or below: nothing to re-judge")
    return files


def read_generations(file: Path) -> list[dict]:
    """The rows of a generations.jsonl, each checked for the fields a probe and its answer need."""
    rows = read_jsonl(file)
    for i, row in enumerate(rows, 1):
        for key, kind in (("suite", str), ("prompt", str), ("response", str), ("unsafe", bool)):
            if not isinstance(row.get(key), kind):
                raise SafetyLabError(f"{file}: row {i}: field {key!r} is missing or not a {kind.__name__}")
    return rows


def main_column(folder: Path, tags: list) -> object:
    """The model tag whose metrics are unprefixed in the folder's metrics.json (None: prefix every tag)."""
    metrics = folder / "metrics.json"
    try:
        keys = json.loads(metrics.read_text()) if metrics.exists() else {}
    except ValueError as e:
        raise SafetyLabError(f"rejudge: {metrics}: invalid JSON ({e})") from None
    prefixed = {k.split("/")[0].split(".")[0] for k in keys if "." in k.split("/")[0]}
    unprefixed = [t for t in dict.fromkeys(tags) if t not in prefixed]
    return unprefixed[0] if len(unprefixed) == 1 else None


def folder_metrics(
    rows: list[dict], judgements: list[Judgement], judge: Judge, by: list[str], main: object
) -> dict[str, float]:
    """metrics.json's layout for these verdicts (the `main` tag unprefixed): per model tag and suite,
    `suite_metrics` and the `by` breakdowns."""
    groups: dict[tuple, tuple[list, list]] = {}
    for row, judgement in zip(rows, judgements):
        probes, verdicts = groups.setdefault((row.get("model"), row["suite"]), ([], []))
        probes.append(probe(row))
        verdicts.append(judgement)
    metrics: dict[str, float] = {}
    for (tag, suite), (probes, verdicts) in groups.items():
        prefix = "" if tag == main or tag is None else f"{tag}."
        found = suite_metrics(suite, probes, verdicts, judge.labels)
        for field in by:
            found |= breakdown(suite, probes, verdicts, field, judge.labels)
        metrics |= {prefix + k: v for k, v in found.items()}
    return metrics


def probe(row: dict) -> Probe:
    return Probe(
        row["prompt"], row["unsafe"], row.get("target"), meta=row.get("meta") or {}, opening=row.get("opening")
    )


def build(name: str, args: dict, root: Path) -> Judge:
    try:
        cls = judge_class(name)
        if "cache" in inspect.signature(cls.__init__).parameters:
            args = {"cache": str(root / "judgement_cache.sqlite"), **args}
        return cls(**args)
    except (TypeError, ValueError) as e:
        raise SafetyLabError(f"rejudge: judge {name}: {e}") from None


def verdict_row(row: dict, judgement: Judgement) -> dict:
    return {
        "model": row.get("model"),
        "suite": row["suite"],
        "refused": judgement.refused,
        "complied": judgement.complied,
        **{k: v for k, v in (("score", judgement.score), ("label", judgement.label)) if v is not None},
    }


def write_lines(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
    os.replace(tmp, path)


def rejudge(root: Path, overrides: list[str]) -> list[Path]:
    """Re-judge every generations.jsonl under `root`; returns the folders written. Every input is checked before
    the judge is built and anything is written."""
    root = Path(root)
    chosen = settings(overrides)
    runs = {file.parent: read_generations(file) for file in generation_files(root)}
    mains = {folder: main_column(folder, [r.get("model") for r in rows]) for folder, rows in runs.items()}
    for field in chosen["by"]:
        if not any(field in (row.get("meta") or {}) for rows in runs.values() for row in rows):
            raise SafetyLabError(f"rejudge: by={field}: no generation has a probe field {field!r} (`meta`)")
    judge = build(chosen["judge"], chosen["judge_args"], root)
    for folder, rows in runs.items():
        judgements = judge.judge([probe(r) for r in rows], [r["response"] for r in rows])
        metrics = folder_metrics(rows, judgements, judge, chosen["by"], mains[folder])
        write_lines(
            folder / f"judgements_{chosen['name']}.jsonl", [verdict_row(r, j) for r, j in zip(rows, judgements)]
        )
        write_json_atomic(folder / f"metrics_{chosen['name']}.json", {"judge": chosen["judge"], **metrics})
    return list(runs)


# ---- agreement between judges ----------------------------------------------------------------------------------
def run_judge(folder: Path, root: Path | None = None) -> str:
    """`<judge> (run)`: the judge the run itself used, `eval.judge` in the `.hydra/config.yaml` of `folder` or of
    its nearest ancestor (up to `root`); `run` where there is none."""
    for parent in (folder, *folder.parents):
        config = parent / ".hydra" / "config.yaml"
        if config.exists():
            judge = (OmegaConf.load(config).get("eval") or {}).get("judge")
            return f"{judge} (run)" if judge else "run"
        if parent == root:
            break
    return "run"


def verdict_sets(folder: Path, root: Path | None = None) -> dict[str, list[dict]]:
    """{judge: verdict rows aligned with the folder's generations.jsonl}: the run's own judge (its verdicts are in
    the generations) and every `judgements_<name>.jsonl`; nothing without those. A judgements file of another
    length than the generations is left out."""
    files = sorted(folder.glob("judgements_*.jsonl"))
    if not files or not (folder / GENERATIONS).exists():
        return {}
    generations = read_jsonl(folder / GENERATIONS)
    sets = {run_judge(folder, root): generations}
    for file in files:
        rows = read_jsonl(file)
        if len(rows) == len(generations):
            sets[file.stem.removeprefix("judgements_")] = rows
    return sets


def agreement(folder: Path, root: Path | None = None) -> list[dict]:
    """For every pair of judges of the folder's generations, per model tag, suite and verdict (refused, complied)
    that both give: n, each judge's rate and Cohen's kappa. Empty when only the run's own judge has judged."""
    sets = verdict_sets(Path(folder), root)
    out = []
    for (name_a, a), (name_b, b) in itertools.combinations(sets.items(), 2):
        groups: dict[tuple, list[tuple[dict, dict]]] = {}
        for x, y in zip(a, b):
            groups.setdefault((x.get("model"), x.get("suite")), []).append((x, y))
        for (tag, suite), pairs in groups.items():
            for verdict in VERDICTS:
                both = [
                    (x[verdict], y[verdict])
                    for x, y in pairs
                    if isinstance(x.get(verdict), bool) and isinstance(y.get(verdict), bool)
                ]
                if not both:
                    continue
                xs, ys = zip(*both)
                out.append(
                    {
                        "model": tag,
                        "suite": suite,
                        "verdict": verdict,
                        "n": len(both),
                        "judge_a": name_a,
                        "rate_a": sum(xs) / len(xs),
                        "judge_b": name_b,
                        "rate_b": sum(ys) / len(ys),
                        "kappa": cohens_kappa(xs, ys),
                    }
                )
    return out


def kappa_text(kappa: float) -> str:
    return "—" if math.isnan(kappa) else f"{kappa:.3f}"


def main(argv: list[str]) -> int:
    if not argv or argv[0].startswith("-"):
        print(USAGE, file=sys.stderr)
        return 2
    try:
        folders = rejudge(Path(argv[0]), argv[1:])
    except SafetyLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    name = settings(argv[1:])["name"]
    for folder in folders:
        print(f"{folder}: metrics_{name}.json, judgements_{name}.jsonl")
        for r in agreement(folder, Path(argv[0])):
            if r["judge_b"] == name:
                print(
                    f"  {r['model']} {r['suite']} {r['verdict']}: {r['judge_a']} {r['rate_a']:.3f}, "
                    f"{name} {r['rate_b']:.3f}, kappa {kappa_text(r['kappa'])} (n={r['n']})"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
