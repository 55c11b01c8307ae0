"""Searched trade-offs: one metric of a run, bounded by others, as the value an Optuna sweep optimises.

With `hydra/sweeper=optuna` every job is a trial whose return value the sweeper optimises. A `search` node names
the metric to optimise and lower bounds on others (`search: {metric: harmful_obey/compliance_rate, direction:
minimize, bounds: {utility/accuracy: 0.93}}`); a trial that breaks a bound scores worse than every trial that keeps
them all (its metric's worst value, 1, pushed further by how far it missed), so the search is steered back inside
the bounds without hard-failing trials. Examples: conf/experiment/search_*.yaml, experiments/search/README.md.
"""

from __future__ import annotations

from safety_lab.errors import SafetyLabError

DIRECTIONS = ("minimize", "maximize")


def check_search(search, suites) -> None:
    """One line for a search that cannot work: an unknown direction, or a metric or bound on no evaluated suite."""
    if search.get("direction") not in DIRECTIONS:
        raise SafetyLabError(f"search.direction={search.get('direction')!r} is not one of {', '.join(DIRECTIONS)}")
    for where, metric in [
        ("search.metric", search.get("metric")),
        *((f"search.bounds.{k}", k) for k in search.get("bounds") or {}),
    ]:
        suite = str(metric).split("/")[0]
        if "/" not in str(metric) or suite not in suites:
            raise SafetyLabError(
                f"{where}: {metric!r} is not a metric of an evaluated suite "
                f"(<suite>/<metric>, suites: {', '.join(sorted(suites))})"
            )


def objective(metrics: dict, search) -> float:
    """The value the sweeper optimises: `metrics[search.metric]` if every bound holds, else the metric's worst value
    plus the total shortfall (minimize) or minus it (maximize)."""
    for key in [search.metric, *(search.get("bounds") or {})]:
        if key not in metrics:
            raise SafetyLabError(
                f"search: {key!r} is not in the run's metrics.json (it has "
                f"{', '.join(sorted(k for k in metrics if '/' in k)[:8])}, …)"
            )
    shortfall = sum(max(0.0, bound - metrics[key]) for key, bound in (search.get("bounds") or {}).items())
    if search.direction == "minimize":
        return 1.0 + shortfall if shortfall else float(metrics[search.metric])
    return -shortfall if shortfall else float(metrics[search.metric])
