"""Batched greedy evaluation vs the seed codebases' way (one `generate` call per prompt), same outputs.

Target: ≥ 5× prompts/s, with identical responses verified prompt by prompt.
"""

from __future__ import annotations

import torch

from bench.common import median_time, peak_rss_of, quickstart_base, record, timed
from safety_lab.eval.generate import generate
from safety_lab.worlds.synthetic import views

N_PROMPTS = 200


def one_by_one(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    out = []
    with torch.inference_mode():
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt")
            tokens = model.generate(
                **ids, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id
            )
            out.append(tokenizer.decode(tokens[0, ids["input_ids"].shape[1] :], skip_special_tokens=True).strip())
    return out


def main() -> None:
    stages, base = quickstart_base()
    model, tokenizer = base.model.eval(), base.tokenizer
    suites = [views.suite(stages.world, name, N_PROMPTS // len(views.SUITES)) for name in views.SUITES]
    prompts = [p.prompt for suite in suites for p in suite]
    new = stages.world.spec.max_len + 2
    batched, batched_rss = peak_rss_of(lambda: generate(model, tokenizer, prompts, new, batch_size=256, progress=False))
    baseline, loop_seconds, loop_rss = timed(lambda: one_by_one(model, tokenizer, prompts, new))
    mismatches = sum(a != b for a, b in zip(batched, baseline))
    if mismatches:
        raise SystemExit(f"batched generation differs from the per-prompt loop on {mismatches} prompts")
    batched_seconds = median_time(lambda: generate(model, tokenizer, prompts, new, batch_size=256, progress=False))
    record(
        "generation: batched greedy vs per-prompt generate",
        len(prompts) / batched_seconds,
        len(prompts) / loop_seconds,
        "prompts/s",
        5.0,
        True,
        "python -m bench.generation",
        f"{len(prompts)} prompts, identical outputs",
        rss=(batched_rss, loop_rss),
    )


if __name__ == "__main__":
    main()
