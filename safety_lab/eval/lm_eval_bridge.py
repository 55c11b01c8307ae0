"""Utility through lm-evaluation-harness on the model already in memory (no reload, LoRA merged or not).

`lm_eval_utility` wraps the model in lm-eval's `HFLM` and runs `simple_evaluate`; tasks are registry names
(mmlu, copa, xcopa, xnli, gsm8k: these download their data from the hub) or tasks defined by local YAML files in
`include_path` (offline: `dataset_path: json` with `data_files`). The results come back as flat
`<task>/<metric>` keys of the result contract, e.g. `copa/acc`, `gsm8k/exact_match_flexible-extract`.
lm-eval is an optional extra (`make install-real`).
"""

from __future__ import annotations

import logging

from safety_lab.errors import SafetyLabError
from safety_lab.models.factory import eval_mode

log = logging.getLogger(__name__)


def flatten_results(results: dict[str, dict]) -> dict[str, float]:
    """lm-eval's {task: {"acc,none": v, "acc_stderr,none": s, "alias": ...}} → {"task/acc": v}; a filter other
    than `none` stays in the name (`exact_match_flexible-extract`); stderr and non-numbers are dropped."""
    flat = {}
    for task, values in results.items():
        for key, value in values.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            flat[f"{task}/{metric if filt == 'none' else f'{metric}_{filt}'}"] = float(value)
    return flat


def lm_eval_utility(
    model,
    tokenizer,
    tasks: list,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    apply_chat_template: bool = False,
    seed: int = 0,
) -> dict[str, float]:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise SafetyLabError("eval.lm_eval needs lm-evaluation-harness: `make install-real`") from e
    with eval_mode(model):
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        manager = TaskManager(include_path=include_path, include_defaults=include_path is None)
        unknown = [t for t in tasks if isinstance(t, str) and t not in manager.all_tasks]
        if unknown:
            raise SafetyLabError(
                f"eval.lm_eval.tasks: unknown task(s) {unknown}"
                + (f" (include_path={include_path})" if include_path else "")
            )
        out = simple_evaluate(
            model=lm,
            tasks=list(tasks),
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=0,
            log_samples=False,
            apply_chat_template=apply_chat_template,
            random_seed=seed,
            numpy_random_seed=seed,
            torch_random_seed=seed,
            fewshot_random_seed=seed,
        )
    return flatten_results(out["results"])
