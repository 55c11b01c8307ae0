"""Training throughput and hardware efficiency of SFT on the default tiny model.

1. SFT tokens/s through the framework (`Stages.fit` + `SFTModule`, i.e. Lightning with the default trainer and
   logger) against a minimal hand-written PyTorch loop doing identical work: same freshly initialised default tiny
   Llama, same batches in the same order (a seeded shuffling DataLoader, which the framework's sampler reproduces),
   same loss, AdamW, warm-up/cosine schedule, gradient clipping, fp32, threads, and the model `torch.compile`d in
   place on both sides (the framework's `model.compile_min_steps=0`; off by default, see safety_lab/config.py).
   The final weights of both sides are
   compared (they must agree to rounding). Timed as pairs run back to back in alternating order; the figure is the
   ratio of the medians (target ≥ 0.90×).
2. Achieved training FLOP/s of the framework side — 6·N·tokens (N: weights of the matmuls: the linear layers and the
   output projection, which shares the embedding's weights; the embedding lookup does no FLOPs) plus
   causal attention 6·layers·T²·d per sequence of T real tokens — as a fraction of this machine's fp32 matmul
   peak, measured between the pairs with 2048² matmuls: informational (no target) at this scale, where 96-wide
   matmuls decide it; the target is bench/real_train.py's on SmolLM2. A wider variant of the same architecture
   (hidden 512) is reported as a separate, clearly labelled row.

    .venv/bin/python -m bench.train_step [--pairs 5] [--steps 40] [--threads N] [--profile]

`--profile` prints where the framework's time goes (torch.profiler, by operator) instead of recording figures.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

from bench.common import compose, median_time, peak_rss_of, record
from safety_lab.data.collate import TokenizedExamples
from safety_lab.methods.losses import token_cross_entropy
from safety_lab.methods.sft import SFTModule, warmup_cosine
from safety_lab.worlds.synthetic import views

SEED, BATCH, LR, WARMUP = 0, 128, 1e-3, 0.05
WIDE = {"hidden_size": 512, "num_heads": 8, "intermediate_size": 2048}


def matmul_peak_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / median_time(lambda: torch.mm(a, b), repeats=5, warmup=2)


def hand_loop(model, data: TokenizedExamples) -> None:
    model.compile(dynamic=True)  # as the framework does with model.compile_min_steps=0 (setup), deterministically
    torch.use_deterministic_algorithms(True, warn_only=True)
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, shuffle=True, collate_fn=data.collate, generator=torch.Generator().manual_seed(SEED)
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.98), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(max(1, int(WARMUP * len(loader))), len(loader))
    )
    model.train()
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        token_cross_entropy(logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)


def setup(steps: int, **shape):
    """(stages, fresh tiny Llama of the default shapes unless overridden, training rows)."""
    from safety_lab.config import plain
    from safety_lab.models.factory import tiny_llama
    from safety_lab.stages import Stages
    from safety_lab.worlds.synthetic.tokenizer import build_tokenizer

    stages = Stages(compose("trainer.enable_progress_bar=false", "model.compile_min_steps=0"))
    tokenizer, m = build_tokenizer(stages.world), {**plain(stages.cfg.model), **shape}
    model = tiny_llama(
        tokenizer,
        m["hidden_size"],
        m["num_layers"],
        m["num_heads"],
        m["intermediate_size"],
        m["max_position_embeddings"],
        seed=SEED,
    )
    data = TokenizedExamples(views.pretrain(stages.world, steps * BATCH, seed=1), tokenizer, max_length=m["max_length"])
    return stages, model, data


def training_flops(model, lengths: list[int]) -> float:
    """Matmul FLOPs of one training pass over sequences of `lengths` real tokens (module docstring)."""
    c = model.config
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))  # lm_head (tied) too
    return 6 * n * sum(lengths) + 6 * c.num_hidden_layers * c.hidden_size * sum(t * t for t in lengths)


def timed(fn) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of fn()."""

    def run() -> float:
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    return peak_rss_of(run)


def framework_fit(stages, model, data) -> None:
    stages.fit("bench", SFTModule(model, lr=LR, warmup_ratio=WARMUP), data, BATCH, 1, SEED)


def profile(steps: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    stages, model, data = setup(steps)
    framework_fit(stages, copy.deepcopy(model), data)  # warm-up
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        framework_fit(stages, copy.deepcopy(model), data)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=5, help="back-to-back (hand, framework) pairs")
    parser.add_argument("--steps", type=int, default=40, help="optimiser steps of 128 rows per run")
    parser.add_argument("--threads", type=int, help="torch intra-op threads of both sides (default: torch's)")
    parser.add_argument("--profile", action="store_true")
    a = parser.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.profile:
        return profile(a.steps)
    command = f"python -m bench.train_step --pairs {a.pairs} --steps {a.steps}"
    command += f" --threads {a.threads}" if a.threads else ""
    stages, base, data = setup(a.steps)
    tokens = sum(len(ids) for ids, _ in data.rows)

    hand_model, framework_model = copy.deepcopy(base), copy.deepcopy(base)
    hand_loop(hand_model, data)  # warm-up of both, and the check that they do the same work
    framework_fit(stages, framework_model, data)
    drift = max((h - f).abs().max().item() for h, f in zip(hand_model.parameters(), framework_model.parameters()))
    if drift > 1e-4:
        raise SystemExit(f"the framework and the hand-written loop trained different weights (max |Δ| {drift:.2e})")
    hand, framework, peaks, hand_rss, framework_rss = [], [], [], 0.0, 0.0
    for i in range(a.pairs):
        sides = [
            ("hand", lambda: hand_loop(copy.deepcopy(base), data)),
            ("framework", lambda: framework_fit(stages, copy.deepcopy(base), data)),
        ]
        for side, fn in sides if i % 2 == 0 else sides[::-1]:
            seconds, rss = timed(fn)
            (hand if side == "hand" else framework).append(seconds)
            if side == "hand":
                hand_rss = max(hand_rss, rss)
            else:
                framework_rss = max(framework_rss, rss)
        peaks.append(matmul_peak_flops())
        print(
            f"pair {i}: hand {hand[-1]:.2f} s, framework {framework[-1]:.2f} s, "
            f"ratio {hand[-1] / framework[-1]:.3f}, matmul peak {peaks[-1] / 1e9:.1f} GFLOP/s",
            flush=True,
        )
    hand_s, framework_s, peak = statistics.median(hand), statistics.median(framework), statistics.median(peaks)
    pair_ratios = sorted(h / f for h, f in zip(hand, framework))
    note = (
        f"{a.steps} steps of {BATCH} rows ({tokens} tokens), fresh default tiny Llama, fp32, "
        f"{torch.get_num_threads()} threads; {a.pairs} alternating pairs, per-pair ratios "
        f"{pair_ratios[0]:.2f}–{pair_ratios[-1]:.2f}; final weights agree to {drift:.1e}"
    )
    record(
        "training step: SFT via Lightning vs hand-written loop",
        tokens / framework_s,
        tokens / hand_s,
        "tokens/s",
        0.90,
        True,
        command,
        note,
        rss=(framework_rss, hand_rss),
    )
    record(
        "hardware efficiency: training FLOP/s / fp32 matmul peak",
        training_flops(base, [len(ids) for ids, _ in data.rows]) / framework_s,
        peak,
        "FLOP/s",
        None,
        True,
        command,
        f"default tiny Llama (hidden 96), framework side of the pairs; peak = median of {a.pairs} 2048² matmuls",
        rss=(framework_rss, framework_rss),
    )
    wide_efficiency(a.steps, command)


def wide_efficiency(steps: int, command: str) -> None:
    """The same measure on a wider variant (not the default model): what the CPU reaches once matmuls are big."""
    wide_steps = max(2, steps // 8)
    stages, model, data = setup(wide_steps, **WIDE)
    runs, peaks = [], []
    for _ in range(2):  # the first run is also the warm-up
        runs.append(timed(lambda: framework_fit(stages, copy.deepcopy(model), data)))
        peaks.append(matmul_peak_flops())
    seconds, peak, rss = min(s for s, _ in runs), max(peaks), max(r for _, r in runs)
    record(
        "hardware efficiency, wider variant (hidden 512, 8 heads, ff 2048; NOT the default model)",
        training_flops(model, [len(ids) for ids, _ in data.rows]) / seconds,
        peak,
        "FLOP/s",
        None,
        True,
        command,
        f"{wide_steps} steps of {BATCH} rows, framework side, best of 2 against the best of 2 peaks",
        rss=(rss, rss),
    )


if __name__ == "__main__":
    main()
