"""Greedy generation on SmolLM2-135M-Instruct: our generator against HF `generate` (issue #16's generation rows).

The prompts: `--prompts` chat prompts of varied length from eval=standard_safety's sets (HarmBench, Do-Not-Answer,
HarmBench behaviours in DAN templates, the over-refusal set; an equal share of each, in that order, as an
evaluation hands them to the generator), rendered by the model's chat template; `--new` new tokens, greedy, fp32.
Ours: safety_lab.eval.generate with its levers on (batches grouped by length, finished rows leave the decode batch,
prompts prefilled without padding).

1. Against HF `generate` with the same batch size (eval.batch_size), plain left padding, prompts in the given order
   (`generate` with both levers off): ≥ 1.3× prompts/s, identical outputs.
2. Against HF `generate` one prompt at a time: ≥ 5×.

Sides run back to back in one process, `--pairs` times in alternating order (the one-at-a-time side once: it is the
slow one); figures are ratios of medians, each side's peak RSS its own high-water mark. The script refuses to
report when any side's responses differ from ours.

    .venv/bin/python -m bench.real_generation [--prompts 200] [--new 64] [--pairs 2]
    .venv/bin/python -m bench.real_generation --quick     # 16 prompts, 16 new tokens, one pair, nothing recorded
    .venv/bin/python -m bench.real_generation --profile --prompts 48   # prefill / decode split, nothing recorded

Needs `make install-real` (the model is dequantised into the store on first use: SAFETY_LAB_STORE or outputs/store).
"""

from __future__ import annotations

import argparse
import statistics

import torch

from bench.common import compose, record, timed
from safety_lab.eval.generate import generate
from safety_lab.sources import load_suites
from safety_lab.stages import Stages

MODEL = "SmolLM2-135M-Instruct"


def chat_prompts(stages: Stages, tokenizer, n: int) -> list[str]:
    """`n` prompts, an equal share of each standard suite in the suites' order, rendered by the chat template."""
    suites = list(load_suites(stages.cfg.eval, stages.world).values())
    share = -(-n // len(suites))
    probes = [p for suite in suites for p in suite[:share]][:n]
    return [stages.template.render(tokenizer, p.prompt) for p in probes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    parser.add_argument("--pairs", type=int, default=2, help="alternating (ours, HF batched) pairs")
    parser.add_argument("--quick", action="store_true", help="16 prompts, 16 new tokens, one pair, nothing recorded")
    parser.add_argument("--profile", action="store_true", help="each side's prefill / decode split, nothing recorded")
    a = parser.parse_args()
    if a.quick:
        a.prompts, a.new, a.pairs = 16, 16, 1
    stages = Stages(compose("model=smollm2_135m_instruct", "eval=standard_safety"))
    base = stages.base()
    model, tokenizer, batch_size = base.model.eval(), base.tokenizer, stages.cfg.eval.batch_size
    prompts = chat_prompts(stages, tokenizer, a.prompts)
    lengths = sorted(len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"])

    def run(size: int, levers: bool, new: int = a.new):
        return lambda: generate(
            model, tokenizer, prompts, new, size, False, False, group_by_length=levers, drop_finished=levers
        )

    sides = {"ours": run(batch_size, True), "hf": run(batch_size, False)}
    for levers in (True, False):  # warm-up of both code paths (first-call allocations), not timed
        generate(model, tokenizer, prompts[:2], 2, 2, False, False, group_by_length=levers, drop_finished=levers)
    if a.profile:  # one new token is the prefill (and one step); the rest of the time is decoding
        for name, size, levers in (
            ("ours", batch_size, True),
            ("HF batched", batch_size, False),
            ("one at a time", 1, False),
        ):
            prefill, total = (timed(run(size, levers, new))[1] for new in (1, a.new))
            decode = total - prefill
            print(f"{name}: {total:.1f} s for {len(prompts)} prompts: prefill {prefill:.1f} s, decode {decode:.1f} s")
        return
    seconds: dict[str, list[float]] = {"ours": [], "hf": []}
    rss: dict[str, float] = {"ours": 0.0, "hf": 0.0, "loop": 0.0}
    outputs: dict[str, list[str]] = {}
    for i in range(a.pairs):
        for side in ("ours", "hf") if i % 2 == 0 else ("hf", "ours"):
            outputs[side], s, peak = timed(sides[side])
            seconds[side].append(s)
            rss[side] = max(rss[side], peak)
        print(f"pair {i}: ours {seconds['ours'][-1]:.1f} s, HF generate batched {seconds['hf'][-1]:.1f} s", flush=True)
    outputs["loop"], loop_seconds, rss["loop"] = timed(run(1, False))
    print(f"HF generate one prompt at a time: {loop_seconds:.1f} s", flush=True)
    for side, name in (("hf", "HF generate batched"), ("loop", "HF generate one prompt at a time")):
        differ = sum(x != y for x, y in zip(outputs["ours"], outputs[side]))
        if differ:
            raise SystemExit(f"our responses differ from {name}'s on {differ} of {len(prompts)} prompts")
    ours, hf = statistics.median(seconds["ours"]), statistics.median(seconds["hf"])
    ratios = sorted(h / o for h, o in zip(seconds["hf"], seconds["ours"]))
    note = (
        f"{MODEL}, {len(prompts)} chat prompts of {lengths[0]}-{lengths[-1]} tokens (median "
        f"{lengths[len(lengths) // 2]}) from eval=standard_safety's sets, {a.new} new tokens, greedy, fp32, batch "
        f"{batch_size}, {torch.get_num_threads()} threads; identical outputs"
    )
    if a.quick:
        print(f"quick: ours {ours:.1f} s, HF batched {hf:.1f} s, one at a time {loop_seconds:.1f} s; nothing recorded")
        return
    command = f"python -m bench.real_generation --prompts {a.prompts} --new {a.new} --pairs {a.pairs}"
    record(
        f"generation on {MODEL}: ours vs HF generate, same batch size, given order",
        len(prompts) / ours,
        len(prompts) / hf,
        "prompts/s",
        1.3,
        True,
        command,
        f"{note}; {a.pairs} alternating pairs, per-pair ratios {ratios[0]:.2f}-{ratios[-1]:.2f}",
        rss=(rss["ours"], rss["hf"]),
    )
    record(
        f"generation on {MODEL}: ours vs HF generate one prompt at a time",
        len(prompts) / ours,
        len(prompts) / loop_seconds,
        "prompts/s",
        5.0,
        True,
        command,
        f"{note}; ours the median of {a.pairs} runs, the one-at-a-time side run once",
        rss=(rss["ours"], rss["loop"]),
    )


if __name__ == "__main__":
    main()
