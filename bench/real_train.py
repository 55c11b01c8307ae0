"""Training on SmolLM2-135M-Instruct: DPO and SFT epochs against TRL, and a full fine-tuning step against the
machine's fp32 matmul peak (issue #16's training rows).

Every side runs in a fresh child process (same libraries imported, so peak RSS compares like with like), its clock
running from "model and records in memory" to "epoch done" (tokenisation, reference log-probs and training
included; our reference cache starts empty). Sides of a figure run back to back, `--repeats` times in rotating
order; figures are ratios of medians. Both sides train the same fp32 SmolLM2 with the same LoRA (r 16, α 32, every
linear layer), pairs, batch, learning rate, β and epoch; tokens are those of the chosen and the rejected sequence
(prompt included in each), so the ratio is one of times. Ours: `method=dpo` / `method=sft` with
`model.packing=true` (safety_lab/methods/packing.py: no padding, a pair's prompt once, logits only where a label is
predicted). The data: the store's on-policy pairs (the first `pairs/*/pairs.jsonl`: SmolLM2's own answers and
refusals to HarmBench / Do-Not-Answer and safe prompts, chat template, varied lengths), `--pairs` of them drawn
with seed 0; without any, fixed pairs built from the shipped safe prompts (answers of 1-8 other prompts' words,
refusals from dataset=onpolicy_safety).

1. DPO epoch vs TRL `DPOTrainer` with its defaults (gradient checkpointing on, reference computed by every step;
   fp32 as ours: `bf16=False`): ≥ 2.0× tokens/s and ≤ 1.0× peak RSS.
2. The same vs TRL's fastest configuration that runs here: `precompute_ref_log_probs=True`, no gradient
   checkpointing (its `padding_free` falls back to padding since TRL's DPO refactor): ≥ 1.3×.
3. SFT epoch (the pairs' chosen sides, loss on the answers) vs TRL `SFTTrainer` with `padding_free=True` and
   no gradient checkpointing: ≥ 1.2×.
4. Full fine-tuning steps (`method.lora=null`, AdamW, packed) as training FLOP/s (bench/train_step.py's count:
   6·N·tokens + 6·layers·Σ T²·d) over the fp32 peak of 2048² matmuls measured in the same child: ≥ 0.55.

The script refuses to report when the sides do not compute the same thing: our reference log-probs against TRL's
precomputed ones (per token within 1e-4), and our SFT's labelled tokens against TRL's completion tokens.

    .venv/bin/python -m bench.real_train [--pairs 24] [--batch-size 8] [--repeats 3] [--full-steps 6]
    .venv/bin/python -m bench.real_train --quick     # a handful of pairs, one repeat, nothing recorded
    .venv/bin/python -m bench.real_train --profile   # where the full fine-tuning steps' time goes, by operator

Needs `make install-real` (the model is dequantised into the store on first use); the store is
SAFETY_LAB_STORE or outputs/store, only read (each side trains in a temporary store).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import REPO, compose, print_result, record, side_result
from bench.dpo import LORA, lora_config

MODEL = "SmolLM2-135M-Instruct"
LR, BETA, MAX_LENGTH, SEED = 5e-4, 0.1, 512, 0
SIDES = ("dpo_ours", "dpo_trl", "dpo_trl_fast", "sft_ours", "sft_trl", "full")


def base_and_pairs(n: int):
    """(SmolLM2 as a stages.Model, its prompt template, `n` realistic preference pairs, where they come from)."""
    from safety_lab.data.records import Preference
    from safety_lab.data.template import PromptTemplate
    from safety_lab.stages import Stages

    stages = Stages(compose("model=smollm2_135m_instruct", "dataset=onpolicy_safety"))
    files = sorted(Path(stages.cfg.paths.artifacts, "pairs").glob("*/pairs.jsonl"))
    if files:
        rows = [json.loads(line) for line in files[0].read_text().splitlines()]
        source = f"on-policy pairs {files[0].parent.name}"
    else:
        prompts = [json.loads(line)["prompt"] for line in (REPO / "safety_lab/data/sets/benign_train.jsonl").open()]
        refusals = list(stages.cfg.dataset.args.refusals)
        rows = [
            {"prompt": p, "chosen": " ".join(prompts[i + 1 : i + 2 + i % 8]), "rejected": refusals[i % len(refusals)]}
            for i, p in enumerate(prompts[:-9])
        ]
        source = "built from benign_train.jsonl (no on-policy pairs in the store)"
    rows = random.Random(SEED).sample(rows, min(n, len(rows)))
    pairs = [Preference(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    return stages.base(), PromptTemplate(**stages.cfg.model.template), pairs, source


def our_stages(store: str, method: str, data: Path, batch_size: int, *extra: str):
    from safety_lab.stages import Stages

    lora = [f"method.lora.r={LORA['r']}", f"method.lora.alpha={LORA['alpha']}"]
    return Stages(
        compose(
            "model=smollm2_135m_instruct",
            f"model.max_length={MAX_LENGTH}",
            "model.packing=true",
            f"method={method}",
            "dataset=jsonl",
            f"dataset.path={data}",
            "dataset.preferences=true",
            "dataset.n=null",
            f"method.batch_size={batch_size}",
            "method.epochs=1",
            f"method.lr={LR}",
            *lora,
            "trainer.enable_progress_bar=false",
            "trainer.enable_checkpointing=false",
            f"paths.artifacts={store}",
            f"hydra.run.dir={store}/run",
            *extra,
        )
    )


def write_pairs(pairs, folder: str) -> Path:
    path = Path(folder) / "pairs.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n" for p in pairs)
    )
    return path


def count_tokens(pairs, tokenizer, template, sft: bool) -> int:
    """Tokens of the chosen and the rejected sequence of every pair (prompt included in each); SFT's: the chosen."""
    from safety_lab.data.collate import TokenizedPreferences

    rows = TokenizedPreferences(pairs, tokenizer, template, MAX_LENGTH).rows
    return sum(len(c[0]) + (0 if sft else len(r[0])) for _, c, r in rows)


def dpo_ours(base, template, pairs, batch_size: int) -> dict:
    from safetensors.torch import load_file

    from safety_lab.methods.dpo import DPO

    store = tempfile.mkdtemp()
    stages = our_stages(
        store, "dpo", write_pairs(pairs, store), batch_size, f"method.beta={BETA}", "method.beta_rejected=null"
    )
    start = time.perf_counter()
    DPO().train(stages, base, stages.cfg.method, stages.cfg.dataset)
    seconds = time.perf_counter() - start
    (ref,) = Path(store, "ref_logps").glob("*/ref_logps.safetensors")
    reference = load_file(str(ref))
    return {"seconds": seconds, "ref_logps": reference["logps"].tolist(), "ref_counts": reference["counts"].tolist()}


def trl_rows(pairs, template, tokenizer, key: str = "chosen") -> dict:
    """TRL's standard (non-conversational) layout: our chat-rendered prompt, the answers as they are (TRL adds EOS)."""
    prompts = [template.render(tokenizer, p.prompt) for p in pairs]
    if key == "completion":
        return {"prompt": prompts, "completion": [p.chosen for p in pairs]}
    return {"prompt": prompts, "chosen": [p.chosen for p in pairs], "rejected": [p.rejected for p in pairs]}


def trl_common(batch_size: int) -> dict:
    return {
        "output_dir": tempfile.mkdtemp(),
        "per_device_train_batch_size": batch_size,
        "num_train_epochs": 1,
        "learning_rate": LR,
        "max_length": MAX_LENGTH,
        "bf16": False,  # TRL's default is bf16 autocast; ours and the comparison are fp32
        "report_to": "none",
        "use_cpu": True,
        "save_strategy": "no",
        "logging_steps": 10_000,
        "disable_tqdm": True,
        "seed": SEED,
    }


def dpo_trl(base, template, pairs, batch_size: int, fast: bool) -> dict:
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    fastest = {"precompute_ref_log_probs": True, "gradient_checkpointing": False} if fast else {}
    args = DPOConfig(beta=BETA, **trl_common(batch_size), **fastest)
    start = time.perf_counter()
    trainer = DPOTrainer(
        model=base.model,
        args=args,
        train_dataset=Dataset.from_dict(trl_rows(pairs, template, base.tokenizer)),
        processing_class=base.tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    seconds = time.perf_counter() - start
    if not fast:
        return {"seconds": seconds}
    data = trainer.train_dataset
    return {
        "seconds": seconds,
        "ref_logps": [list(r) for r in zip(data["ref_chosen_logps"], data["ref_rejected_logps"])],
    }


def sft_ours(base, template, pairs, batch_size: int) -> dict:
    from safety_lab.data.batching import loss_units
    from safety_lab.methods.sft import SFT, sft_data

    store = tempfile.mkdtemp()
    stages = our_stages(store, "sft", write_pairs(pairs, store), batch_size)
    start = time.perf_counter()
    SFT().train(stages, base, stages.cfg.method, stages.cfg.dataset)
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "labelled": sum(loss_units(sft_data(stages, base, stages.cfg.method, stages.cfg.dataset))),
    }


def sft_trl(base, template, pairs, batch_size: int) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    # padding-free without packing needs max_length None (the rows are shorter than ours: the labelled-token check)
    args = SFTConfig(padding_free=True, gradient_checkpointing=False, **{**trl_common(batch_size), "max_length": None})
    start = time.perf_counter()
    trainer = SFTTrainer(
        model=base.model,
        args=args,
        train_dataset=Dataset.from_dict(trl_rows(pairs, template, base.tokenizer, "completion")),
        processing_class=base.tokenizer,
        peft_config=lora_config(),
    )
    trainer.train()
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "labelled": sum(label != -100 for row in trainer.train_dataset["labels"] for label in row),
    }


def full(base, template, pairs, batch_size: int, steps: int, around=None) -> dict:
    """Training FLOP/s of `steps` full fine-tuning steps (the first one, a warm-up, not counted) and the fp32
    matmul peak measured before and after them; the fit runs inside the context `around` (a profiler)."""
    import torch

    from bench.train_step import matmul_peak_flops, training_flops
    from safety_lab.data.batching import GlobalBatchSampler, loss_units
    from safety_lab.methods.packing import Packed
    from safety_lab.methods.sft import SFTModule, sft_data

    store = tempfile.mkdtemp()
    stages = our_stages(
        store,
        "sft",
        write_pairs(pairs[: steps * batch_size], store),
        batch_size,
        "method.lora=null",
        "method.train_on_prompt=true",
    )
    data = sft_data(stages, base, stages.cfg.method, stages.cfg.dataset)
    plan = GlobalBatchSampler(loss_units(data), batch_size, 1, SEED).plan(0)  # the micro-batches `fit` will take
    lengths = [[len(data[i][0]) for i in micro.indices] for micro in plan]
    times = []

    class Timed(SFTModule):
        def on_train_batch_start(self, batch, batch_idx):
            times.append(time.perf_counter())

        def on_train_batch_end(self, outputs, batch, batch_idx):
            times[-1] = time.perf_counter() - times[-1]

    peaks = [matmul_peak_flops()]
    with around or contextlib.nullcontext():
        stages.fit("full", Timed(base.model.requires_grad_(True), lr=LR), Packed(data), batch_size, 1, SEED)
    peaks.append(matmul_peak_flops())
    return {
        "seconds": sum(times[1:]),
        "steps": len(times) - 1,  # timed: at most --full-steps - 1, as many as --pairs fill
        "flops": sum(training_flops(base.model, step) for step in lengths[1:]),
        "peak": statistics.median(peaks),
        "threads": torch.get_num_threads(),
    }


def profile_full(a) -> None:
    """Print where the full fine-tuning side's time goes (torch.profiler, by operator; nothing recorded)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    base, template, pairs, _ = base_and_pairs(a.pairs)
    prof = torch_profile(activities=[ProfilerActivity.CPU])
    result = full(base, template, pairs, a.batch_size, a.full_steps, around=prof)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(f"{result['steps']} timed steps: {result['flops'] / result['seconds']:.3e} FLOP/s, peak {result['peak']:.3e}")


def child(side: str, a) -> None:
    base, template, pairs, source = base_and_pairs(a.pairs)
    if side == "full":
        result = full(base, template, pairs, a.batch_size, a.full_steps)
    elif side.startswith("dpo_trl"):
        result = dpo_trl(base, template, pairs, a.batch_size, fast=side == "dpo_trl_fast")
    else:
        result = {"dpo_ours": dpo_ours, "sft_ours": sft_ours, "sft_trl": sft_trl}[side](
            base, template, pairs, a.batch_size
        )
    tokens = count_tokens(pairs, base.tokenizer, template, sft=side.startswith("sft"))
    print_result({**result, "tokens": tokens, "source": source})


def measure(side: str, a) -> dict:
    sizes = ("--pairs", str(a.pairs), "--batch-size", str(a.batch_size), "--full-steps", str(a.full_steps))
    result = side_result("bench.real_train", side, *sizes)
    print(f"{side}: {result['seconds']:.1f} s, peak RSS {result['peak_rss_mib']:.0f} MiB", flush=True)
    return result


def check_same_work(runs: dict) -> str:
    """Refuse (exit) unless our reference log-probs are TRL's and our SFT labels TRL's completion tokens."""
    ours, theirs = runs["dpo_ours"][0], runs["dpo_trl_fast"][0]
    per_token = max(
        abs(a - b) / max(1, n)
        for pair, trl, counts in zip(ours["ref_logps"], theirs["ref_logps"], ours["ref_counts"])
        for a, b, n in zip(pair, trl, counts)
    )
    if len(ours["ref_logps"]) != len(theirs["ref_logps"]) or per_token > 1e-4:
        raise SystemExit(f"our reference log-probs differ from TRL's: {per_token:.2e} per token (tolerance 1e-4)")
    labelled = runs["sft_ours"][0]["labelled"], runs["sft_trl"][0]["labelled"]
    if labelled[0] != labelled[1]:
        raise SystemExit(f"our SFT trains on {labelled[0]} labelled tokens, TRL's on {labelled[1]}")
    return f"reference log-probs equal TRL's within {per_token:.1e} per token; SFT labels {labelled[0]} tokens on both"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every side, in rotating order")
    parser.add_argument("--full-steps", type=int, default=6, help="full fine-tuning steps (the first not timed)")
    parser.add_argument("--quick", action="store_true", help="8 pairs, batch 4, one round, nothing recorded")
    parser.add_argument("--side", choices=SIDES, help="run one side in this process (the children)")
    parser.add_argument("--profile", action="store_true", help="the full side under torch.profiler, nothing recorded")
    a = parser.parse_args()
    if a.profile:
        return profile_full(a)
    if a.quick:
        a.pairs, a.batch_size, a.repeats, a.full_steps = 8, 4, 1, 2
    if a.side:
        return child(a.side, a)
    runs = {side: [] for side in SIDES}
    for repeat in range(a.repeats):
        dpo = SIDES[:3][repeat % 3 :] + SIDES[:3][: repeat % 3]
        sft = SIDES[3:5] if repeat % 2 == 0 else SIDES[3:5][::-1]
        for side in (*dpo, *sft):
            runs[side].append(measure(side, a))
    runs["full"].append(measure("full", a))  # a ratio to a peak measured in the same process: one run
    same = check_same_work(runs)
    med = {
        side: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "peak_rss_mib")} for side, rs in runs.items()
    }
    tokens = {side: rs[0]["tokens"] for side, rs in runs.items()}
    note = (
        f"{MODEL}, {a.pairs} pairs ({runs['dpo_ours'][0]['source']}), batch {a.batch_size}, 1 epoch, LoRA r16 "
        f"all-linear, fp32, {tokens['dpo_ours']} DPO / {tokens['sft_ours']} SFT tokens; medians of {a.repeats} "
        f"rotating rounds; {same}"
    )
    print(note)
    (full_run,) = runs["full"]
    efficiency = full_run["flops"] / full_run["seconds"] / full_run["peak"]
    if a.quick:
        speeds = {side: round(tokens[side] / m["seconds"]) for side, m in med.items() if side != "full"}
        return print(f"tokens/s {speeds}; full fine-tuning {efficiency:.3f} of the matmul peak")
    command = f"python -m bench.real_train --pairs {a.pairs} --batch-size {a.batch_size} --repeats {a.repeats}"

    def versus(name: str, ours: str, theirs: str, target: float) -> None:
        rss = (med[ours]["peak_rss_mib"], med[theirs]["peak_rss_mib"])
        record(
            name,
            tokens[ours] / med[ours]["seconds"],
            tokens[theirs] / med[theirs]["seconds"],
            "tokens/s",
            target,
            True,
            command,
            note,
            rss,
        )

    versus(f"{MODEL} DPO epoch: method=dpo vs TRL DPOTrainer defaults, throughput", "dpo_ours", "dpo_trl", 2.0)
    rss = (med["dpo_ours"]["peak_rss_mib"], med["dpo_trl"]["peak_rss_mib"])
    record(
        f"{MODEL} DPO epoch: method=dpo vs TRL DPOTrainer defaults, peak RSS",
        *rss,
        "MiB",
        1.0,
        False,
        command,
        note,
        rss,
    )
    versus(
        f"{MODEL} DPO epoch: method=dpo vs TRL DPOTrainer fastest (precomputed reference)",
        "dpo_ours",
        "dpo_trl_fast",
        1.3,
    )
    versus(f"{MODEL} SFT epoch: method=sft vs TRL SFTTrainer padding-free", "sft_ours", "sft_trl", 1.2)
    record(
        f"{MODEL} full fine-tuning step: training FLOP/s / fp32 matmul peak",
        full_run["flops"] / full_run["seconds"],
        full_run["peak"],
        "FLOP/s",
        0.55,
        True,
        command + f" --full-steps {a.full_steps}",
        f"{MODEL}, method=sft method.lora=null model.packing=true, batch {a.batch_size}, "
        f"{runs['full'][0]['steps']} timed steps; peak: 2048² fp32 matmuls before and after, same process",
        (med["full"]["peak_rss_mib"],) * 2,
    )


if __name__ == "__main__":
    main()
