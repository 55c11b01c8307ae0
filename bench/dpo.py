"""One DPO epoch with safety_lab's `method=dpo` against TRL's DPOTrainer: tokens per second and peak memory (RSS).

Same tiny Llama (the synthetic world's architecture, seeded init), same LoRA config, same preference pairs, batch
size, learning rate, β and epoch count; each side runs in a fresh child process of this script, back to back
(`--repeats` pairs in alternating order, medians reported), so peak RSS is the high-water mark of one process that
imported the same libraries. The clock runs from "model and records in memory" to "epoch done" on both sides
(tokenisation, reference log-probs and training included; our reference cache starts empty). Tokens = prompt +
response tokens of chosen and rejected, counted once per pair.

    .venv/bin/python -m bench.dpo [--pairs 2048] [--batch-size 32] [--repeats 3]

Targets: ≥ 2.0× TRL's tokens/s and ≤ 1.0× its peak RSS; recorded in bench/results.json and bench/README.md.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from bench.common import compose, print_result, record, side_result

LR, BETA, LORA = 1e-3, 0.1, {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}


def setup(pairs: int):
    import lightning  # noqa: F401  both sides import the same libraries, so RSS compares like with like
    import trl  # noqa: F401

    from safety_lab.config import ModelConfig
    from safety_lab.models.factory import tiny_llama
    from safety_lab.worlds.synthetic import views
    from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
    from safety_lab.worlds.synthetic.world import World

    world = World()
    tokenizer = build_tokenizer(world)
    m = ModelConfig()
    model = tiny_llama(
        tokenizer, m.hidden_size, m.num_layers, m.num_heads, m.intermediate_size, m.max_position_embeddings, seed=0
    )
    return world, tokenizer, model, views.preferences(world, pairs, seed=0)


def lora_config():
    """`LORA` as peft's config, for TRL's side."""
    from peft import LoraConfig

    return LoraConfig(
        r=LORA["r"],
        lora_alpha=LORA["alpha"],
        lora_dropout=LORA["dropout"],
        target_modules=LORA["target_modules"],
        task_type="CAUSAL_LM",
    )


def count_tokens(records, tokenizer) -> int:
    from safety_lab.data.collate import TokenizedPreferences

    return sum(len(c[0]) + len(r[0]) for _, c, r in TokenizedPreferences(records, tokenizer, max_length=128).rows)


def ours(pairs: int, batch_size: int) -> dict:
    from safety_lab.methods.dpo import DPO
    from safety_lab.stages import Model, Stages

    _, tokenizer, model, records = setup(pairs)
    store = tempfile.mkdtemp()  # an empty reference cache: the epoch pays for its reference log-probs
    stages = Stages(
        compose(
            "method=dpo",
            "dataset=preferences",
            f"dataset.n={pairs}",
            f"method.batch_size={batch_size}",
            "method.epochs=1",
            f"method.lr={LR}",
            f"method.beta={BETA}",
            "trainer.enable_progress_bar=false",
            "trainer.enable_checkpointing=false",
            f"paths.artifacts={store}",
            f"hydra.run.dir={store}/run",
        )
    )
    start = time.perf_counter()
    DPO().train(stages, Model(model, tokenizer, "bench"), stages.cfg.method, stages.cfg.dataset)
    return {"seconds": time.perf_counter() - start, "tokens": count_tokens(records, tokenizer)}


def trl_baseline(pairs: int, batch_size: int) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    world, tokenizer, model, records = setup(pairs)
    rows = {
        "prompt": [r.prompt for r in records],
        "chosen": [" " + r.chosen for r in records],
        "rejected": [" " + r.rejected for r in records],
    }
    out = tempfile.mkdtemp()
    args = DPOConfig(
        output_dir=out,
        per_device_train_batch_size=batch_size,
        num_train_epochs=1,
        learning_rate=LR,
        beta=BETA,
        max_length=128,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        logging_steps=10_000,
        disable_tqdm=True,
        max_grad_norm=1.0,
    )
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    return {"seconds": time.perf_counter() - start, "tokens": count_tokens(records, tokenizer)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="back-to-back pairs, in alternating order")
    parser.add_argument("--side", choices=("ours", "trl"), help="run one side in this process (the children)")
    a = parser.parse_args()
    if a.side:
        return print_result((ours if a.side == "ours" else trl_baseline)(a.pairs, a.batch_size))
    runs = {"ours": [], "trl": []}
    for repeat in range(a.repeats):
        for side in ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours"):
            runs[side].append(
                side_result("bench.dpo", side, "--pairs", str(a.pairs), "--batch-size", str(a.batch_size))
            )
    mine, theirs = (
        {key: statistics.median(run[key] for run in runs[side]) for key in runs[side][0]} for side in ("ours", "trl")
    )
    spread = sorted(round(trl["seconds"] / us["seconds"], 2) for us, trl in zip(runs["ours"], runs["trl"]))
    note = (
        f"{a.pairs} pairs, batch {a.batch_size}, LoRA r16 all-linear, {mine['tokens']} tokens/epoch; medians of "
        f"{a.repeats} alternating pairs, per-pair throughput ratios {spread}"
    )
    command = f"python -m bench.dpo --pairs {a.pairs} --batch-size {a.batch_size} --repeats {a.repeats}"
    print(note)
    for name, side in (("safety_lab", mine), ("TRL", theirs)):
        print(
            f"{name}: {side['seconds']:.1f} s, {side['tokens'] / side['seconds']:.0f} tokens/s, "
            f"peak RSS {side['peak_rss_mib']:.0f} MiB"
        )
    record(
        "DPO epoch: method=dpo vs TRL DPOTrainer, throughput",
        mine["tokens"] / mine["seconds"],
        theirs["tokens"] / theirs["seconds"],
        "tokens/s",
        2.0,
        True,
        command,
        note,
        rss=(mine["peak_rss_mib"], theirs["peak_rss_mib"]),
    )
    record(
        "DPO epoch: method=dpo vs TRL DPOTrainer, peak RSS",
        mine["peak_rss_mib"],
        theirs["peak_rss_mib"],
        "MiB",
        1.0,
        False,
        command,
        note,
        rss=(mine["peak_rss_mib"], theirs["peak_rss_mib"]),
    )


if __name__ == "__main__":
    main()
