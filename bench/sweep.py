"""An 11-point λ sweep of the LoRA-fusion study: safety_lab's in-process sweep against the naive way, back to back.

Naive (what the seed's notebook does, per λ): load the aligned base from disk, load the task and safety adapters
with PEFT, `add_weighted_adapter(..., combination_type="cat")`, evaluate with that adapter active.
Ours: one loaded model; per λ, `FusedModel.set(λ)` writes W0 + (1−λ)ΔW_task + λΔW_safety, then evaluate.
Both evaluate the same suites of `+experiment=lora_fusion` (eval.n prompts each) and must give the same metrics.
Also measured: each extra λ's step (weight write + evaluation) against a plain evaluation of the same model.

    .venv/bin/python -m bench.sweep [--n 200] [HYDRA_OVERRIDE ...]

The model is the experiment's tiny Llama whatever its training data, so the timing does not depend on how long
its inputs were trained: `+debug=fast align.dataset.n=64 fusion.inputs.task.dataset.n=64
fusion.inputs.safety.dataset.n=64 paths.artifacts=/tmp/store` times the same work on quickly trained weights.

The adapters come from the shared store (trained first if missing, outside the clock).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from bench.common import compose, peak_rss_of, record

WEIGHTS = [round(0.1 * i, 1) for i in range(11)]


def setup(n: int, overrides: list[str]):
    from safety_lab.eval.evaluate import evaluate
    from safety_lab.eval.judges import build_judge
    from safety_lab.sources import load_suites
    from safety_lab.stages import Stages

    stages = Stages(compose("+experiment=lora_fusion", f"eval.n={n}", "trainer.enable_progress_bar=false", *overrides))
    cfg, world = stages.cfg, stages.world
    base = stages.base()
    folders = {}
    for role, stage in cfg.fusion.inputs.items():
        tuned = stages.apply(base, stage.method, stage.dataset)
        tuned.model.unload()
        folders[role] = Path(cfg.paths.artifacts) / tuned.id
    suites, judge = load_suites(cfg.eval, world), build_judge(cfg.eval.judge, **cfg.eval.judge_args)

    def assess(m) -> dict:
        metrics, _ = evaluate(
            m,
            base.tokenizer,
            suites,
            judge,
            stages.template,
            max_new_tokens=world.spec.max_len + 2,
            batch_size=cfg.eval.batch_size,
            progress=False,
        )
        return metrics

    return base.model, base.tokenizer, folders, assess


def naive(base_folder: Path, folders: dict, assess) -> tuple[float, list[dict]]:
    from peft import PeftModel

    from safety_lab.models.factory import load_pretrained

    start, results = time.perf_counter(), []
    for weight in WEIGHTS:
        model, _ = load_pretrained(base_folder)
        peft_model = PeftModel.from_pretrained(model, str(folders["task"]), adapter_name="task")
        peft_model.load_adapter(str(folders["safety"]), adapter_name="safety")
        peft_model.add_weighted_adapter(["task", "safety"], [1 - weight, weight], "fused", combination_type="cat")
        peft_model.set_adapter("fused")
        results.append(assess(peft_model.eval()))
    return time.perf_counter() - start, results


def ours(base_folder: Path, folders: dict, assess) -> tuple[float, list[float], list[dict]]:
    """(sweep wall time, per extra λ: its step (set + evaluate) / a plain evaluation right after it, metrics)."""
    from peft import PeftModel

    from safety_lab.fusion.apply import FusedModel, stage_input
    from safety_lab.models.factory import load_pretrained

    start, steps, plain, results = time.perf_counter(), [], [], []
    model, _ = load_pretrained(base_folder)
    inputs = {
        role: stage_input(PeftModel.from_pretrained(model, str(folder)), model) for role, folder in folders.items()
    }
    fused = FusedModel(model.eval(), inputs, "lora_weighted", {})
    total = time.perf_counter() - start
    for weight in WEIGHTS:
        step = time.perf_counter()
        results.append(assess(fused.set(weight)))
        steps.append(time.perf_counter() - step)
        step = time.perf_counter()  # interleaved, off the sweep's clock: a plain evaluation of the same model
        assess(fused.model)
        plain.append(time.perf_counter() - step)
    total += sum(steps)
    return total, [s / p for s, p in zip(steps[1:], plain[1:])], results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=200, help="prompts per suite")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the lora_fusion config, e.g. a store")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer, folders, assess = setup(args.n, args.overrides)
    from safety_lab.models.factory import save_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        base_folder = Path(tmp) / "aligned"
        save_pretrained(model, tokenizer, base_folder)  # what the naive way reloads per point
        (ours_time, step_ratios, ours_results), ours_rss = peak_rss_of(lambda: ours(base_folder, folders, assess))
        (naive_time, naive_results), naive_rss = peak_rss_of(lambda: naive(base_folder, folders, assess))
    # fp32 merged weights vs PEFT's unmerged adapter forward: the same model up to rounding
    diff = max(abs(a[k] - b[k]) for a, b in zip(ours_results, naive_results) for k in a)
    marginal = sorted(step_ratios)[len(step_ratios) // 2]  # median over the 10 λ after the first
    note = f"11 λ, lora_fusion suites × {args.n} prompts; largest metric difference {diff:.3f}"
    record(
        "fusion sweep: in-process 11-λ sweep vs naive reload+PEFT cat per λ",
        ours_time,
        naive_time,
        "s",
        0.5,
        False,
        "python -m bench.sweep",
        note,
        rss=(ours_rss, naive_rss),
    )
    record(
        "fusion sweep: marginal cost per extra λ / one evaluation",
        marginal,
        1.0,
        "x",
        1.15,
        False,
        "python -m bench.sweep",
        "median over 10 λ of (set + evaluate) / a plain evaluation of the same model",
        rss=(ours_rss, ours_rss),
    )


if __name__ == "__main__":
    main()
