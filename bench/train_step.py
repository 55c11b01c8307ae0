"""Training throughput and hardware efficiency of SFT on the default tiny model.

1. SFT tokens/s through the framework (`Context.fit` + `SFTModule`, i.e. Lightning) against a minimal hand-written
   PyTorch loop on the same model, batches and optimiser (target ≥ 0.90×).
2. Achieved training FLOP/s — 6·N·tokens plus attention (6·layers·T²·d per sequence, forward+backward) — as a
   fraction of this machine's fp32 matrix-multiply peak, measured here with large square matmuls (target ≥ 0.50).
"""
from __future__ import annotations

import copy

import torch

from bench.common import median_time, quickstart_base, record
from safety_lab.data.collate import TokenizedExamples
from safety_lab.methods.losses import token_cross_entropy
from safety_lab.methods.sft import SFTModule
from safety_lab.worlds.synthetic import views

STEPS, BATCH = 60, 128


def matmul_peak_flops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = median_time(lambda: torch.mm(a, b), repeats=5, warmup=2)
    return 2 * n**3 / seconds


def hand_loop(model, loader, lr: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.0)
    model.train()
    for batch in loader:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss = token_cross_entropy(logits, batch["labels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def main() -> None:
    ctx, base, tokenizer = quickstart_base()
    data = TokenizedExamples(views.pretrain(ctx.world, STEPS * BATCH, seed=1), tokenizer, max_length=128)
    loader = torch.utils.data.DataLoader(data, batch_size=BATCH, shuffle=False, collate_fn=data.collate)
    tokens = sum(len(ids) for ids, _ in data.rows)

    def framework() -> None:
        ctx.fit("bench", SFTModule(copy.deepcopy(base), lr=1e-3), data, BATCH, 1, 0)

    # alternate the two, medians of three after one warm-up each: the machine's noise hits both alike
    hand_seconds = median_time(lambda: hand_loop(copy.deepcopy(base), loader, 1e-3))
    framework_seconds = median_time(framework)
    hand_seconds = min(hand_seconds, median_time(lambda: hand_loop(copy.deepcopy(base), loader, 1e-3), warmup=0))
    record("training step: SFT via Lightning vs hand-written loop", tokens / framework_seconds,
           tokens / hand_seconds, "tokens/s", 0.90, True, "python -m bench.train_step",
           f"{STEPS} steps of {BATCH}, tiny Llama, fp32 CPU")

    n_params = sum(p.numel() for p in base.parameters() if p.dim() > 1 and p is not base.get_input_embeddings().weight)
    cfg = base.config
    mean_len = tokens / len(data)
    flops = 6 * n_params * tokens + 6 * cfg.num_hidden_layers * mean_len**2 * cfg.hidden_size * len(data)
    peak = matmul_peak_flops()
    record("hardware efficiency: training FLOP/s / fp32 matmul peak", flops / framework_seconds, peak, "FLOP/s",
           0.50, True, "python -m bench.train_step", f"N={n_params} non-embedding weights, {tokens} tokens")


if __name__ == "__main__":
    main()
