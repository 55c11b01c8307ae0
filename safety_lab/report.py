"""Sweep reports: the `metrics.json` of every job of a multirun (or every λ of an in-process sweep) gathered into
`report.csv` (every metric), `report.md` (every metric with its interval) and plots against λ, in the sweep folder.

    python -m safety_lab.report DIR

also runs by itself at the end of every multirun (`SweepReport`, a Hydra callback in conf/hydra/default.yaml).
A job that failed leaves `failed.json` instead of `metrics.json` (see `__main__`); it gets a row marked FAILED.
Plots: `curves.png` — harmfulness (`harmful*/compliance_rate`, and HarmBench's, Do-Not-Answer's and the jailbreak
suites'), over-refusal (`borderline*/refusal_rate`, `over_refusal/refusal_rate`) and utility (`utility*/accuracy`,
lm-eval's `utility_mc/acc`) against λ (`fusion/weight`, else the job number) with 95% interval bars — and
`pareto.png`, harmfulness against utility with the Pareto front (less harm, more utility) drawn through.

Seeds: jobs whose overrides are equal once `seed=…` is left out, and whose λ is equal (an in-process sweep's
`weight=<λ>/` folders), form a group. When a group has two jobs or more, `report.md` also gets a table over seeds:
per group and metric `mean ± std [min, max] (n=k)`, std the sample standard deviation (ddof=1; `—` for one seed),
n the successful jobs; failed jobs are left out and counted (`failed k of n`). `report_seeds.csv` has the same
numbers (a row per group and metric, std blank for one seed), and the plots show the groups' means instead of the
jobs: `curves.png` with a min–max band over seeds, `pareto.png` with ±1 std bars and the front through the means.

Judges: where a job's generations were judged again (`python -m safety_lab.rejudge`, `judgements_<name>.jsonl`
beside its generations), `report.md` gets a table of every pair of judges per model, suite and verdict (refused,
complied): both judges' rates and their agreement, Cohen's kappa; `report_judges.csv` has the same rows.

Every file is written whole (a temp file renamed over it). A malformed `metrics.json` or `failed.json` stops the
report before anything is written, with a SafetyLabError naming the file: one line from the CLI (exit 2) and in
the multirun's log.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
import statistics
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

from safety_lab.config import FinetuneAttackConfig
from safety_lab.errors import SafetyLabError
from safety_lab.rejudge import agreement, kappa_text

log = logging.getLogger(__name__)
WEIGHT = "fusion/weight"
# each panel's metrics, by key: the synthetic world's suites and the standard real-model ones (eval=standard_safety)
PANELS = (
    ("harmfulness", r"(harmful[^./]*|harmbench|donotanswer|jailbreak[^./]*)/compliance_rate"),
    ("over-refusal", r"(borderline[^./]*|over_refusal)/refusal_rate"),
    ("utility", r"utility[^./]*/acc(uracy)?"),
)
CI = ("_ci_low", "_ci_high")  # suffixes of a metric's 95% interval bounds
SEED_COLUMNS = [WEIGHT, "overrides", "jobs", "failed", "metric", "n", "mean", "std", "min", "max"]
JUDGE_COLUMNS = ["job", "model", "suite", "verdict", "n", "judge_a", "rate_a", "judge_b", "rate_b", "kappa"]
# the harmful fine-tuning grid (task=defend): rows, columns, and each cell's metrics with their heatmap colours: a
# role of the attack's `metrics` (config.FinetuneAttackConfig: role -> the job's metrics.json key); GRID_KEYS, the
# defaults, serve a job whose config names none
GRID_AXES = ("defense", "attack")
GRID = (
    ("harmful score", "harmful", "Reds"),
    ("fine-tune accuracy", "accuracy", "Greens"),
    ("over-refusal", "over_refusal", "Oranges"),
)
GRID_KEYS = FinetuneAttackConfig().metrics
GRID_COLUMNS = [*GRID_AXES, "jobs", "failed", "metric", "n", "mean", "std", "min", "max"]


def _natural(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _job_yaml(folder: Path, root: Path, name: str):
    """`.hydra/<name>` of the job `folder` belongs to (its own or its nearest ancestor's), read; None if none."""
    for parent in (folder, *folder.parents):
        if (parent / ".hydra" / name).exists():
            return yaml.safe_load((parent / ".hydra" / name).read_text())
        if parent == root:
            break
    return None


def _overrides(folder: Path, root: Path) -> list[str]:
    """The Hydra overrides of the job `folder` belongs to."""
    return _job_yaml(folder, root, "overrides.yaml") or []


def _grid_cell(folder: Path, root: Path) -> dict:
    """The grid cell of a harmful fine-tuning job (`task=defend`): its `attack` and `defense` choices and, under
    `grid`, its attack's `metrics` (role -> key); else {}."""
    choices = ((_job_yaml(folder, root, "hydra.yaml") or {}).get("hydra") or {}).get("runtime", {}).get("choices", {})
    if not all(k in choices for k in GRID_AXES):
        return {}
    metrics = ((_job_yaml(folder, root, "config.yaml") or {}).get("attack") or {}).get("metrics") or {}
    return {**{k: choices[k] for k in GRID_AXES}, "grid": metrics}


def _read(path: Path) -> dict:
    """The JSON object in `path`, whose `<suite>/<metric>` entries are numbers; else a one-line SafetyLabError."""
    try:
        data = json.loads(path.read_text())
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise SafetyLabError(f"report: {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SafetyLabError(f"report: {path}: not a JSON object: {json.dumps(data)[:60]}")
    bad = [k for k, v in data.items() if "/" in k and (isinstance(v, bool) or not isinstance(v, (int, float)))]
    if bad:
        raise SafetyLabError(f"report: {path}: {bad[0]} is {json.dumps(data[bad[0]])}, not a number")
    return data


def collect(root: Path) -> list[dict]:
    """One row per result folder under `root`: `job`, `status`, `overrides`, `error`, λ and every metric."""
    root, rows = Path(root), []
    if not root.is_dir():
        raise SafetyLabError(f"report: {root} " + ("is not a folder" if root.exists() else "does not exist"))
    folders = {
        p.parent
        for name in ("metrics.json", "failed.json")
        for p in root.rglob(name)
        if not any(part.startswith(".") for part in p.relative_to(root).parts)
    }
    for folder in sorted(folders, key=lambda f: _natural(str(f.relative_to(root)))):
        overrides = _overrides(folder, root)
        row = {
            "job": str(folder.relative_to(root)) or ".",
            "overrides": " ".join(overrides),
            **_grid_cell(folder, root),
        }
        if (folder / "metrics.json").exists():
            row |= {"status": "ok", "error": "", **_read(folder / "metrics.json")}
        else:
            row |= {"status": "FAILED", "error": str(_read(folder / "failed.json").get("error", ""))}
            weight = [o.split("=", 1)[1] for o in overrides if o.startswith("fusion.weight=")]
            if weight:
                try:
                    row[WEIGHT] = float(weight[0])
                except ValueError:
                    pass
        rows.append(row)
    return rows


def _without_seed(overrides: str) -> str:
    return " ".join(o for o in overrides.split() if not o.lstrip("+").startswith("seed="))


def seed_groups(rows: list[dict]) -> dict[tuple[str, float | None], list[dict]]:
    """The rows by (overrides without `seed=…`, λ), in order. A failed job without λ (an in-process sweep that
    failed before its `weight=<λ>/` folders) counts in each λ group of its command."""
    groups: dict[tuple[str, float | None], list[dict]] = {}
    for r in rows:
        groups.setdefault((_without_seed(r["overrides"]), r.get(WEIGHT)), []).append(r)
    for base, weight in list(groups):
        split = [k for k in groups if k[0] == base and k[1] is not None]
        if weight is None and split and all(r["status"] != "ok" for r in groups[base, None]):
            for key in split:
                groups[key] += groups[base, None]
            del groups[base, None]
    return groups


def aggregate(values: list[float]) -> dict:
    """`n`, `mean`, `std` (sample standard deviation, ddof=1; None for one value), `min` and `max` of `values`."""
    return {
        "n": len(values),
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarize(groups: dict[tuple[str, float | None], list[dict]], keys: list[str]) -> list[dict]:
    """Per group: `overrides` (without seed), λ if any, `jobs`, `failed` and `stats`, the `aggregate` of each of
    `keys` over the group's successful jobs (failed ones left out)."""
    summaries = []
    for (overrides, weight), group in groups.items():
        ok = [r for r in group if r["status"] == "ok"]
        stats = {k: aggregate([r[k] for r in ok if k in r]) for k in keys if any(k in r for r in ok)}
        summaries.append(
            {
                "overrides": overrides,
                **({} if weight is None else {WEIGHT: weight}),
                "jobs": len(group),
                "failed": len(group) - len(ok),
                "stats": stats,
            }
        )
    return summaries


def _metric_keys(rows: list[dict]) -> list[str]:
    """Every `<suite>/<metric>` key: the run's own (unprefixed) first, then other columns' (`base.…`)."""
    keys = dict.fromkeys(k for r in rows for k in r if "/" in k and k != WEIGHT)
    return sorted(keys, key=lambda k: "." in k.split("/")[0])


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return ""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return f"{row[key]:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")


def _stat_cell(stats: dict | None) -> str:
    if stats is None:
        return ""
    std = "—" if stats["std"] is None else f"{stats['std']:.3f}"
    return f"{stats['mean']:.3f} ± {std} [{stats['min']:.3f}, {stats['max']:.3f}] (n={stats['n']})"


def _weight(entry: dict) -> str:
    return f"{entry[WEIGHT]:g}" if WEIGHT in entry else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(cells) + " |" for cells in [header, *rows]]
    return [lines[0], "|" + "---|" * len(header), *lines[1:]]


def _csv(rows: list[dict], columns: list[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def _write(path: Path, content) -> Path:
    """`content` (text, or a matplotlib figure as PNG) into `path` whole: a temp file renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        content.savefig(tmp, format="png", dpi=110)
    os.replace(tmp, path)
    return path


def _seed_table(summaries: list[dict], shown: list[str]) -> list[str]:
    weighted = any(WEIGHT in s for s in summaries)
    several = len({s["overrides"] for s in summaries}) > 1
    header = [*(["λ"] if weighted else []), *(["overrides"] if several else []), "jobs", *shown]
    cells = [
        [
            *([_weight(s)] if weighted else []),
            *([f"`{s['overrides']}`"] if several else []),
            f"failed {s['failed']} of {s['jobs']}" if s["failed"] else str(s["jobs"]),
            *(_stat_cell(s["stats"].get(k)) for k in shown),
        ]
        for s in summaries
    ]
    return [
        "Over seeds (jobs that differ only by `seed=`): mean ± sample standard deviation (ddof=1; — for one "
        "seed) [min, max] (n = successful jobs); failed jobs are left out of the means.",
        "",
        *_table(header, cells),
    ]


def judge_agreement(root: Path, rows: list[dict]) -> list[dict]:
    """`rejudge.agreement` of every successful job under `root`, each row with its `job`."""
    return [{"job": r["job"], **a} for r in rows if r["status"] == "ok" for a in agreement(root / r["job"], root)]


def _judge_table(judges: list[dict]) -> list[str]:
    header = ["job", "model", "suite", "verdict", "n", "judge A", "rate A", "judge B", "rate B", "Cohen's κ"]
    cells = [
        [
            j["job"],
            str(j["model"]),
            j["suite"],
            j["verdict"],
            str(j["n"]),
            j["judge_a"],
            f"{j['rate_a']:.3f}",
            j["judge_b"],
            f"{j['rate_b']:.3f}",
            kappa_text(j["kappa"]),
        ]
        for j in judges
    ]
    return [
        "Judges of the same generations: each judge's rate of the verdict and their agreement (Cohen's κ; — where "
        "both give one verdict throughout).",
        "",
        *_table(header, cells),
    ]


def write_tables(
    rows: list[dict], folder: Path, summaries: list[dict] | None = None, judges: list[dict] | None = None
) -> list[Path]:
    """`report.csv` and `report.md`; with `summaries` (seed groups) also their table and `report_seeds.csv`; with
    `judges` (`judge_agreement`) their table and `report_judges.csv`."""
    keys = _metric_keys(rows)
    paths = [_write(folder / "report.csv", _csv(rows, ["job", "status", WEIGHT, "overrides", "error", *keys]))]
    shown = [k for k in keys if not k.endswith((*CI, "/n"))]
    ok = [r for r in rows if r["status"] == "ok"]  # columns equal in every job (e.g. `base.*`) go below the table
    same = [k for k in shown if len(ok) > 1 and len({_cell(r, k) for r in ok}) == 1]
    shown = [k for k in shown if k not in same]
    weighted = any(WEIGHT in r for r in rows)
    one_command = len(rows) > 1 and len({r["overrides"] for r in rows}) == 1  # an in-process sweep's λ folders
    header = ["job", "status", *(["λ"] if weighted else []), *([] if one_command else ["overrides"]), *shown]

    def cells(r: dict) -> list[str]:
        status = "ok" if r["status"] == "ok" else f"**FAILED**: {r['error']}".replace("|", "\\|")
        overrides = [] if one_command else [f"`{r['overrides']}`" if r["overrides"] else ""]
        return [r["job"], status, *([_weight(r)] if weighted else []), *overrides, *(_cell(r, k) for k in shown)]

    lines = _table(header, [cells(r) for r in rows])
    if one_command and rows[0]["overrides"]:
        lines += ["", f"Every job: `{rows[0]['overrides']}`."]
    if same:
        lines += ["", "Same in every successful job: " + "; ".join(f"{k} {_cell(ok[0], k)}" for k in same) + "."]
    if summaries:
        lines += ["", *_seed_table(summaries, shown)]
        seed_rows = [
            {
                WEIGHT: s.get(WEIGHT),
                "overrides": s["overrides"],
                "jobs": s["jobs"],
                "failed": s["failed"],
                "metric": key,
                **stats,
            }
            for s in summaries
            for key, stats in (s["stats"] or {"": {}}).items()
        ]
        paths.append(_write(folder / "report_seeds.csv", _csv(seed_rows, SEED_COLUMNS)))
    if judges:
        lines += ["", *_judge_table(judges)]
        paths.append(_write(folder / "report_judges.csv", _csv(judges, JUDGE_COLUMNS)))
    return [*paths, _write(folder / "report.md", "\n".join(lines) + "\n")]


def _points(rows: list[dict], summaries: list[dict] | None) -> tuple[list[tuple[float, dict]], str]:
    """What the plots draw, by x: (x, {metric: (y, low, high, std)}), each successful job with its 95% interval or,
    with `summaries`, each group's mean with its min, max and std over seeds; x is λ, else the job/group number."""
    if summaries:
        points = [
            (s.get(WEIGHT), {k: (a["mean"], a["min"], a["max"], a["std"] or 0.0) for k, a in s["stats"].items()})
            for s in summaries
            if s["stats"]
        ]
    else:
        points = [
            (
                r.get(WEIGHT),
                {k: (r[k], r.get(f"{k}_ci_low", r[k]), r.get(f"{k}_ci_high", r[k]), 0.0) for k in _metric_keys([r])},
            )
            for r in rows
            if r["status"] == "ok"
        ]
    if all(x is not None for x, _ in points):
        return sorted(points, key=lambda p: p[0]), "λ (fusion.weight)"
    return list(enumerate(p for _, p in points)), "group" if summaries else "job"


def write_plots(rows: list[dict], folder: Path, summaries: list[dict] | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points, xlabel = _points(rows, summaries)
    if not points:
        return []
    keys = _metric_keys([p for _, p in points])
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, (title, pattern) in zip(axes, PANELS):
        for key in [k for k in keys if re.fullmatch(pattern, k)]:
            xs, values = zip(*[(x, p[key]) for x, p in points if key in p])
            ys, lows, highs, _ = zip(*values)
            if summaries:
                (line,) = ax.plot(xs, ys, marker="o", label=key)
                ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2)
            else:  # max(0, …): a Wilson bound of 1 − 1e-16 lies below a rate of 1
                ax.errorbar(
                    xs,
                    ys,
                    yerr=[
                        [max(0.0, y - lo) for y, lo in zip(ys, lows)],
                        [max(0.0, hi - y) for y, hi in zip(ys, highs)],
                    ],
                    marker="o",
                    capsize=3,
                    label=key,
                )
        ax.set(title=title, xlabel=xlabel, ylim=(-0.03, 1.03))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if summaries:
        fig.suptitle("mean over seeds; shaded: min–max over seeds")
    paths = [_write(folder / "curves.png", fig)]
    plt.close(fig)
    harm = next((k for k in keys if re.fullmatch(PANELS[0][1], k)), None)
    if harm:  # the first harm metric against the utility metric of the same suffix (synthetic language), else the first
        suffix = harm.split("/")[0].removeprefix("harmful")
        uses = [k for k in keys if re.fullmatch(PANELS[2][1], k)]
        use = next((k for k in uses if k.split("/")[0] == f"utility{suffix}"), uses[0] if uses else None)
        if use:
            paths.append(_pareto(plt, points, harm, use, xlabel.split()[0], bool(summaries), folder / "pareto.png"))
    return paths


def _pareto(plt, points: list[tuple[float, dict]], harm: str, use: str, name: str, seeded: bool, path: Path) -> Path:
    """Harm against utility per point (per group: the means, ±1 std bars), the Pareto front through them."""
    pts = [(p[use][0], p[harm][0], x, p[use][3], p[harm][3]) for x, p in points if harm in p and use in p]
    front = sorted(p[:2] for p in pts if not any(q[0] >= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in pts))
    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    if seeded:
        ax.errorbar(
            [p[0] for p in pts],
            [p[1] for p in pts],
            xerr=[p[3] for p in pts],
            yerr=[p[4] for p in pts],
            fmt="none",
            ecolor="gray",
            capsize=3,
            label="±1 std over seeds",
        )
    ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=[p[2] for p in pts], cmap="viridis", zorder=3)
    ax.plot([p[0] for p in front], [p[1] for p in front], "r--", label="Pareto front")
    for u, h, x, *_ in pts:
        ax.annotate(f"{x:g}", (u, h), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(
        xlabel=use,
        ylabel=harm,
        title=("means over seeds: " if seeded else "") + f"harmfulness vs utility (labels: {name})",
    )
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    _write(path, fig)
    plt.close(fig)
    return path


def grid_cells(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """The jobs of a harmful fine-tuning grid by (defense, attack), the no-defense row first, then in the order they
    appear: `jobs`, `failed`, `errors`, `keys` (each GRID role's metric: the jobs' `grid`, else its default) and
    `stats`, the `aggregate` of each key over the successful seeds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        if all(axis in r for axis in GRID_AXES):
            groups.setdefault((r["defense"], r["attack"]), []).append(r)
    cells = {}
    for cell in sorted(groups, key=lambda cell: cell[0] != "none"):
        ok = [r for r in groups[cell] if r["status"] == "ok"]
        given = groups[cell][0].get("grid") or {}
        keys = {role: given.get(role, GRID_KEYS[role]) for _, role, _ in GRID}
        cells[cell] = {
            "jobs": len(groups[cell]),
            "failed": len(groups[cell]) - len(ok),
            "errors": sorted({r["error"] for r in groups[cell] if r["status"] != "ok"}),
            "keys": keys,
            "stats": {
                key: aggregate([r[key] for r in ok if key in r]) for key in keys.values() if any(key in r for r in ok)
            },
        }
    return cells


def _mean_std(stats: dict) -> str:
    return f"{stats['mean']:.3f}" + ("" if stats["std"] is None else f" ± {stats['std']:.3f}")


def _grid_text(cell: dict | None, metrics: tuple = GRID, sep: str = " / ") -> str:
    """A grid cell's metrics (mean ± std over seeds), or FAILED when every seed failed, with the failed count."""
    if cell is None:
        return ""
    if cell["failed"] == cell["jobs"]:
        return f"FAILED ({cell['jobs']} of {cell['jobs']})"
    keys = [cell["keys"][role] for _, role, _ in metrics]
    text = sep.join(_mean_std(cell["stats"][key]) if key in cell["stats"] else "–" for key in keys)
    return text + (f"{sep}(failed {cell['failed']} of {cell['jobs']})" if cell["failed"] else "")


def _grid_mean(cell: dict | None, role: str) -> float:
    import numpy as np

    return cell["stats"].get(cell["keys"][role], {}).get("mean", np.nan) if cell else np.nan


def _grid_figure(cells: dict, defenses: list[str], attacks: list[str], path: Path) -> Path:
    """One heatmap per GRID metric, rows defenses and columns attacks, each cell's mean ± std written in it; a failed
    or missing cell grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(
        1,
        len(GRID),
        figsize=(len(GRID) * (1.2 * len(attacks) + 2), 0.55 * len(defenses) + 1.6),
        constrained_layout=True,
    )
    for ax, metric in zip(axes, GRID):
        title, role, colours = metric
        means = np.array([[_grid_mean(cells.get((d, a)), role) for a in attacks] for d in defenses])
        colour_map = matplotlib.colormaps[colours].with_extremes(bad="lightgrey")
        image = ax.imshow(means, cmap=colour_map, vmin=0, vmax=1, aspect="auto")
        for i, d in enumerate(defenses):
            for j, a in enumerate(attacks):
                text = _grid_text(cells.get((d, a)), (metric,), "\n").replace(" ± ", "\n± ")  # a std under its mean
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=7, color="white" if means[i, j] > 0.6 else "black"
                )
        ax.set_xticks(range(len(attacks)), attacks)
        ax.set_yticks(range(len(defenses)), defenses)
        ax.set(title=title, xlabel="attack", ylabel="defense")
        if defenses[0] == "none":
            ax.axhline(0.5, color="black", linewidth=1.5)  # the no-defense row, set apart
        fig.colorbar(image, ax=ax, shrink=0.8)
    _write(path, fig)
    plt.close(fig)
    return path


def write_grid(rows: list[dict], folder: Path) -> list[Path]:
    """For the jobs of a harmful fine-tuning grid (`+experiment=hft_grid`, task=defend): `grid.md` (rows defenses,
    the no-defense row first; columns attacks; each cell harmful score / fine-tune accuracy / over-refusal, mean ±
    std over seeds), `grid.csv` (a row per cell and metric) and `grid.png` (a heatmap per metric). Nothing for other
    sweeps."""
    cells = grid_cells(rows)
    if not cells:
        return []
    defenses, attacks = (list(dict.fromkeys(cell[axis] for cell in cells)) for axis in (0, 1))
    failures = [f"- `defense={d} attack={a}`: {error}" for (d, a), c in cells.items() for error in c["errors"]]
    keys = {
        role: " or ".join(f"`{k}`" for k in dict.fromkeys(c["keys"][role] for c in cells.values()))
        for _, role, _ in GRID
    }
    lines = [
        f"Harmful fine-tuning grid. Each cell: harmful score ({keys['harmful']}) / fine-tune accuracy "
        f"({keys['accuracy']}) / over-refusal ({keys['over_refusal']}), mean ± sample std over seeds (ddof=1; none "
        "for one seed); failed seeds are left out and counted.",
        "",
        *_table(
            ["defense \\ attack", *attacks], [[d, *(_grid_text(cells.get((d, a))) for a in attacks)] for d in defenses]
        ),
        *(["", "Failed:", *failures] if failures else []),
    ]
    table = [
        {"defense": d, "attack": a, "jobs": c["jobs"], "failed": c["failed"], "metric": key, **c["stats"].get(key, {})}
        for (d, a), c in cells.items()
        for key in c["keys"].values()
    ]
    return [
        _write(folder / "grid.md", "\n".join(lines) + "\n"),
        _write(folder / "grid.csv", _csv(table, GRID_COLUMNS)),
        _grid_figure(cells, defenses, attacks, folder / "grid.png"),
    ]


def write_report(folder: Path) -> list[dict]:
    """Tables and plots of every result under `folder`, written into it; returns the rows. A malformed result file
    raises SafetyLabError before anything is written."""
    folder = Path(folder)
    rows = collect(folder)
    if not rows:
        log.warning(f"no metrics.json or failed.json under {folder}: no report")
        return rows
    groups = seed_groups(rows)
    keys = [k for k in _metric_keys(rows) if not k.endswith(CI)]
    summaries = summarize(groups, keys) if any(len(g) > 1 for g in groups.values()) else None
    write_tables(rows, folder, summaries, judge_agreement(folder, rows))
    write_plots(rows, folder, summaries)
    write_grid(rows, folder)
    failed = [r["job"] for r in rows if r["status"] != "ok"]
    log.info(f"report of {len(rows)} results in {folder}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return rows


class SweepReport(Callback):
    """At the end of a multirun: the report in the sweep folder; the process exits 1 if any job failed or the report
    could not be made (a malformed job file: one error line in the log, no traceback)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        try:
            rows = write_report(Path(config.hydra.sweep.dir))
        except SafetyLabError as e:
            log.error(f"no report: {e}")
            rows = None
        print(config.hydra.sweep.dir)
        failed = [r for r in rows or [] if r["status"] != "ok"]
        if failed:
            print(
                f"error: {len(failed)} of {len(rows)} jobs failed: "
                + "; ".join(f"{r['job']} ({r['error']})" for r in failed),
                file=sys.stderr,
            )
        if failed or rows is None:
            sys.exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m safety_lab.report DIR   (a multirun or sweep folder)", file=sys.stderr)
        return 2
    try:
        rows = write_report(Path(argv[0]))
    except SafetyLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(rows)} results → {Path(argv[0]) / 'report.md'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
