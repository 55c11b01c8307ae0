"""Sweep reports: the `metrics.json` of every job of a multirun (or every λ of an in-process sweep) gathered into
`report.csv` (every metric), `report.md` (every metric with its interval) and plots against λ, in the sweep folder.

    python -m safety_lab.report DIR

also runs by itself at the end of every multirun (`SweepReport`, a Hydra callback in conf/hydra/default.yaml).
A job that failed leaves `failed.json` instead of `metrics.json` (see `__main__`); it gets a row marked FAILED.
Plots: `curves.png` — harmfulness (`harmful*/compliance_rate`), over-refusal (`borderline*/refusal_rate`) and
utility (`utility*/accuracy`) against λ (`fusion/weight`, else the job number) with 95% interval bars — and
`pareto.png`, harmfulness against utility with the Pareto front (less harm, more utility) drawn through.
"""
from __future__ import annotations

import csv
import json
import logging
import re
import sys
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback

log = logging.getLogger(__name__)
WEIGHT = "fusion/weight"
PANELS = (("harmfulness", "harmful", "compliance_rate"), ("over-refusal", "borderline", "refusal_rate"),
          ("utility", "utility", "accuracy"))


def _natural(path: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


def _overrides(folder: Path, root: Path) -> list[str]:
    """The Hydra overrides of the job `folder` belongs to (its own or its nearest ancestor's `.hydra/`)."""
    for parent in (folder, *folder.parents):
        if (parent / ".hydra" / "overrides.yaml").exists():
            return yaml.safe_load((parent / ".hydra" / "overrides.yaml").read_text()) or []
        if parent == root:
            break
    return []


def collect(root: Path) -> list[dict]:
    """One row per result folder under `root`: `job`, `status`, `overrides`, `error`, λ and every metric."""
    root, rows = Path(root), []
    folders = {p.parent for name in ("metrics.json", "failed.json") for p in root.rglob(name)
               if not any(part.startswith(".") for part in p.relative_to(root).parts)}
    for folder in sorted(folders, key=lambda f: _natural(str(f.relative_to(root)))):
        overrides = _overrides(folder, root)
        row = {"job": str(folder.relative_to(root)) or ".", "overrides": " ".join(overrides)}
        if (folder / "metrics.json").exists():
            row |= {"status": "ok", "error": "", **json.loads((folder / "metrics.json").read_text())}
        else:
            failure = json.loads((folder / "failed.json").read_text())
            row |= {"status": "FAILED", "error": failure.get("error", "")}
            weight = [o.split("=", 1)[1] for o in overrides if o.startswith("fusion.weight=")]
            if weight:
                try:
                    row[WEIGHT] = float(weight[0])
                except ValueError:
                    pass
        rows.append(row)
    return rows


def _metric_keys(rows: list[dict]) -> list[str]:
    """Every `<suite>/<metric>` key: the run's own (unprefixed) first, then other columns' (`base.…`)."""
    keys = dict.fromkeys(k for r in rows for k in r if "/" in k and k != WEIGHT)
    return sorted(keys, key=lambda k: "." in k.split("/")[0])


def _cell(row: dict, key: str) -> str:
    if key not in row:
        return ""
    low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
    return f"{row[key]:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None and high is not None else "")


def write_tables(rows: list[dict], folder: Path) -> tuple[Path, Path]:
    keys = _metric_keys(rows)
    head = ["job", "status", WEIGHT, "overrides", "error"]
    with open(folder / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=head + keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    shown = [k for k in keys if not k.endswith(("_ci_low", "_ci_high", "/n"))]
    ok = [r for r in rows if r["status"] == "ok"]  # columns equal in every job (e.g. `base.*`) go below the table
    same = [k for k in shown if len(ok) > 1 and len({_cell(r, k) for r in ok}) == 1]
    shown = [k for k in shown if k not in same]
    weighted = any(WEIGHT in r for r in rows)
    one_command = len(rows) > 1 and len({r["overrides"] for r in rows}) == 1  # an in-process sweep's λ folders
    header = ["job", "status", *(["λ"] if weighted else []), *([] if one_command else ["overrides"]), *shown]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        status = "ok" if r["status"] == "ok" else f"**FAILED**: {r['error']}".replace("|", "\\|")
        weight = [f"{r[WEIGHT]:g}" if WEIGHT in r else ""] if weighted else []
        overrides = [] if one_command else [f"`{r['overrides']}`" if r["overrides"] else ""]
        lines.append("| " + " | ".join([r["job"], status, *weight, *overrides, *(_cell(r, k) for k in shown)]) + " |")
    if one_command and rows[0]["overrides"]:
        lines += ["", f"Every job: `{rows[0]['overrides']}`."]
    if same:
        lines += ["", "Same in every successful job: " + "; ".join(f"{k} {_cell(ok[0], k)}" for k in same) + "."]
    (folder / "report.md").write_text("\n".join(lines) + "\n")
    return folder / "report.csv", folder / "report.md"


def _x(rows: list[dict]) -> tuple[list[float], str]:
    if all(WEIGHT in r for r in rows):
        return [r[WEIGHT] for r in rows], "λ (fusion.weight)"
    return list(range(len(rows))), "job"


def write_plots(rows: list[dict], folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r.get(WEIGHT, 0))
    if not done:
        return []
    x, xlabel = _x(done)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    for ax, (title, suite, metric) in zip(axes, PANELS):
        for key in [k for k in _metric_keys(done) if re.fullmatch(rf"{suite}[^./]*/{metric}", k)]:
            points = [(xi, r) for xi, r in zip(x, done) if key in r]
            ys = [r[key] for _, r in points]
            err = [[max(0.0, y - r.get(f"{key}_ci_low", y)) for y, (_, r) in zip(ys, points)],  # 1 − 1e-16 bounds
                   [max(0.0, r.get(f"{key}_ci_high", y) - y) for y, (_, r) in zip(ys, points)]]
            ax.errorbar([p[0] for p in points], ys, yerr=err, marker="o", capsize=3, label=key)
        ax.set(title=title, xlabel=xlabel, ylim=(-0.03, 1.03))
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.savefig(folder / "curves.png", dpi=110)
    plt.close(fig)
    paths = [folder / "curves.png"]
    harm = next((k for k in _metric_keys(done) if re.fullmatch(r"harmful[^./]*/compliance_rate", k)), None)
    if harm:
        suffix = harm.split("/")[0].removeprefix("harmful")
        use = next((k for k in (f"utility{suffix}/accuracy", "utility/accuracy") if any(k in r for r in done)), None)
        if use:
            paths.append(_pareto(plt, done, x, harm, use, folder / "pareto.png"))
    return paths


def _pareto(plt, rows: list[dict], x: list[float], harm: str, use: str, path: Path) -> Path:
    points = [(r[use], r[harm], xi) for r, xi in zip(rows, x) if harm in r and use in r]
    front = sorted((p for p in points if not any(q[0] >= p[0] and q[1] <= p[1] and q[:2] != p[:2] for q in points)))
    fig, ax = plt.subplots(figsize=(5.5, 4.5), constrained_layout=True)
    ax.scatter([p[0] for p in points], [p[1] for p in points], c=[p[2] for p in points], cmap="viridis", zorder=3)
    ax.plot([p[0] for p in front], [p[1] for p in front], "r--", label="Pareto front")
    for u, h, xi in points:
        ax.annotate(f"{xi:g}", (u, h), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set(xlabel=use, ylabel=harm, title="harmfulness vs utility (labels: λ)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(folder: Path) -> list[dict]:
    """Tables and plots of every result under `folder`, written into it; returns the rows."""
    folder = Path(folder)
    rows = collect(folder)
    if not rows:
        log.warning(f"no metrics.json or failed.json under {folder}: no report")
        return rows
    write_tables(rows, folder)
    write_plots(rows, folder)
    failed = [r["job"] for r in rows if r["status"] != "ok"]
    log.info(f"report of {len(rows)} results in {folder}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return rows


class SweepReport(Callback):
    """At the end of a multirun: the report in the sweep folder; the process exits 1 if any job failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        rows = write_report(Path(config.hydra.sweep.dir))
        failed = [r for r in rows if r["status"] != "ok"]
        print(config.hydra.sweep.dir)
        if failed:
            print(f"error: {len(failed)} of {len(rows)} jobs failed: "
                  + "; ".join(f"{r['job']} ({r['error']})" for r in failed), file=sys.stderr)
            sys.exit(1)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        print("usage: python -m safety_lab.report DIR   (a multirun or sweep folder)", file=sys.stderr)
        return 2
    rows = write_report(Path(argv[0]))
    print(f"{len(rows)} results → {Path(argv[0]) / 'report.md'}")
    return 0 if rows else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
