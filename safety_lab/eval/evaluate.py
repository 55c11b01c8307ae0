"""One model's evaluation: generate for every suite at once, judge each suite, compute its metrics.

All suites' prompts go through a single `generate` call, so batches span suites and the GPU stays full; judging
and metrics are per suite. `results_table` lays several models' metrics side by side for the terminal.
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

from safety_lab.data.records import Probe
from safety_lab.data.template import PromptTemplate
from safety_lab.eval.generate import generate
from safety_lab.eval.judges import Judge
from safety_lab.eval.metrics import suite_metrics


def evaluate(
    model,
    tokenizer,
    suites: dict[str, list[Probe]],
    judge: Judge,
    template: PromptTemplate = PromptTemplate(),
    max_new_tokens: int = 16,
    batch_size: int = 64,
    progress: bool = True,
    generation: dict | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """(metrics over all suites, one generation row per probe with its judgement); prompts go through `template`
    exactly as in training; `generation`: the generator's levers (`eval.generation`), all on when None."""
    probes = [(name, probe) for name, suite in suites.items() for probe in suite]
    prompts = [template.render(tokenizer, p.prompt) for _, p in probes]
    add_special = template.add_special_tokens
    responses = generate(
        model, tokenizer, prompts, max_new_tokens, batch_size, progress, add_special, **(generation or {})
    )
    metrics: dict[str, float] = {}
    rows: list[dict] = []
    start = 0
    for name, suite in suites.items():
        answers = responses[start : start + len(suite)]
        start += len(suite)
        judgements = judge.judge(suite, answers)
        metrics |= suite_metrics(name, suite, judgements, judge.labels)
        rows += [
            {
                "suite": name,
                "prompt": p.prompt,
                "response": r,
                "unsafe": p.unsafe,
                "target": p.target,
                "refused": j.refused,
                "complied": j.complied,
                **{k: v for k, v in (("score", j.score), ("label", j.label), ("opening", p.opening)) if v is not None},
                **({"meta": kept} if (kept := plain_fields(p.meta)) else {}),
            }
            for p, r, j in zip(suite, answers, judgements)
        ]
    return metrics, rows


def plain_fields(meta: dict) -> dict:
    """The fields of a probe's `meta` that JSON holds as they are (text, numbers, flags, lists of them): kept in
    generations.jsonl, so a run can be re-judged or broken down by them later (`safety_lab.rejudge`)."""
    scalar = (str, int, float, bool, type(None))
    return {
        k: v
        for k, v in meta.items()
        if isinstance(v, scalar) or isinstance(v, list) and all(isinstance(x, scalar) for x in v)
    }


HEADER_RULE = box.Box("    \n    \n -- \n    \n    \n    \n    \n    \n", ascii=True)  # box.SIMPLE_HEAD in ASCII


def _cell(metrics: dict[str, float], key: str) -> str:
    if key not in metrics:
        return "-"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    ci = f" [{low:.2f},{high:.2f}]" if low is not None and high is not None else ""
    return f"{metrics[key]:.3f}{ci}"


def results_table(columns: dict[str, dict[str, float]]) -> str:
    """A plain-text table: one row per `<suite>/<metric>`, one column per model tag, cells `value [ci_low,ci_high]`."""
    keys = list(
        dict.fromkeys(
            k for metrics in columns.values() for k in metrics if not k.endswith(("_ci_low", "_ci_high", "/n"))
        )
    )
    table = Table(box=HEADER_RULE, show_edge=False, pad_edge=False)
    table.add_column("metric", no_wrap=True)
    for tag in columns:
        table.add_column(tag, justify="right", no_wrap=True)
    for key in keys:
        table.add_row(key, *(_cell(metrics, key) for metrics in columns.values()))
    console = Console(width=100_000, color_system=None, markup=False, emoji=False, highlight=False)  # text as it is
    with console.capture() as text:
        console.print(table)
    return "\n".join(line.rstrip() for line in text.get().splitlines())
