"""The GPU check (`make gpu-check`): the first thing to run when a GPU is lent, ≤ 8 minutes on one GPU.

Each row is one `python -m safety_lab ...` run in its own process, store and folder, with a time limit: the LoRA-fusion
and realignment studies on SmolLM2-135M-Instruct in `bf16-mixed` on CUDA, at a reduced size (λ 0 / 0.5 / 1, 30
prompts per suite, 16 new tokens, a few training steps), then the fusion study under FSDP2 with one process,
Lightning's FSDP1, gradient checkpointing and a compiled fit. The table gives each row ok / failed (the error's
line) / skipped, its seconds, its key metrics and, beside them, the CPU reference's value and Wilson 95% interval
for the same reduced study with whether the GPU value lies inside it. The reference is a JSON file written by
`--record-reference` from a CPU run (fp32) of the same studies; without one the reference columns show `-`.

    python -m bench.gpu_check [--rows fusion,fsdp1] [--out DIR] [--reference FILE] [--set OVERRIDE ...]
    python -m bench.gpu_check --record-reference FILE      # on a CPU: the two studies in fp32 (long on 2 cores)
    python -m bench.gpu_check --dry-run                    # every row but the GPU-only ones, on the CPU, in seconds

Without CUDA it prints one line and exits 0. `--dry-run` runs the same rows with the synthetic tiny model and
`+debug=fast` in place of SmolLM2 (numbers meaningless), so the plumbing, parsing and table are tested anywhere.
The realignment row is mask-DPO on SmolLM2: an AOA task adapter (the fusion study's data) whose task vector a mask
trained by DPO on on-policy safety pairs realigns (`+experiment=methods_smollm2 method=mask_dpo`); dry, it is
`+experiment=realign`. Rows share their stores' starting weights and on-policy pairs (`SHARED_KINDS`), never an
adapter: each row trains its own. Exit status: 1 when a row failed, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(__file__).with_name("gpu_check_reference.json")
BUDGET_S = 480  # the whole check, on the GPU: rows that would start with less than MIN_ROW_S left are skipped
MIN_ROW_S = 30
NO_CUDA = "gpu-check: no CUDA device (torch {}: torch.cuda.is_available() is False); nothing to check"
SHARED_KINDS = ("base", "dequantised", "pairs")  # store kinds no row checks twice (recipes keep them apart anyway)
AOA_DATA = "${paths.root}/experiments/lora_fusion_smollm2/data/aoa_train.json"
CI = ("_ci_low", "_ci_high")  # the Wilson 95% interval companions of a rate in metrics.json
EXCEPTION = re.compile(r"[A-Za-z_][\w.]*(Error|Exception|Failed|Interrupt)\b")  # `ValueError: …`, `torch.…Error(…`
SUITES = ("harmbench", "donotanswer", "jailbreak_dan", "over_refusal")  # eval=standard_safety's


@dataclass(frozen=True)
class Study:
    """A reduced study: its overrides and key metrics on SmolLM2 (`real`) and with the synthetic tiny model (`dry`).
    Metric keys are `metrics.json` keys, prefixed by the folder below the run folder (`weight=<λ>/`) when not in it."""

    real: tuple[str, ...]
    real_keys: tuple[str, ...]
    dry: tuple[str, ...]
    dry_keys: tuple[str, ...]

    def keys(self, dry_run: bool) -> tuple[str, ...]:
        return self.dry_keys if dry_run else self.real_keys


REAL_EVAL = ("eval.max_new_tokens=16", "eval.lm_eval.limit=30", *(f"eval.suites.{s}.n=30" for s in SUITES))
ONPOLICY = ("args.max_new_tokens=32", "args.batch_size=64", "n=64")  # of an on-policy dataset: 64 pairs
DRY = ("+debug=fast", "align.dataset.n=64", "threads=1")
STUDIES = {
    "fusion": Study(
        real=(
            "+experiment=lora_fusion_smollm2",
            "fusion.weights=[0,0.5,1]",
            "fusion.inputs.task.dataset.n=32",
            "fusion.inputs.task.method.epochs=1",
            "fusion.inputs.safety.method.epochs=1",
            *(f"fusion.inputs.safety.dataset.{o}" for o in ONPOLICY),
            *REAL_EVAL,
        ),
        real_keys=(
            "weight=0/harmbench/compliance_rate",
            "weight=1/harmbench/compliance_rate",
            "weight=1/over_refusal/refusal_rate",
            "weight=0.5/utility_mc/acc",
        ),
        dry=(
            "+experiment=lora_fusion",
            "fusion.weights=[0,0.5,1]",
            "fusion.inputs.task.dataset.n=64",
            "fusion.inputs.safety.dataset.n=64",
            *DRY,
        ),
        dry_keys=(
            "weight=0/harmful_obey/compliance_rate",
            "weight=1/harmful_obey/compliance_rate",
            "weight=1/borderline_obey/refusal_rate",
            "weight=0.5/utility_obey/accuracy",
        ),
    ),
    "realign": Study(
        real=(
            "+experiment=methods_smollm2",
            "method=mask_dpo",
            "method.lr=1e-2",  # as +experiment=realign
            "method.epochs=1",
            "+method@method.tasks.aoa.method=sft",
            "+dataset@method.tasks.aoa.dataset=aoa",
            f"method.tasks.aoa.dataset.path={AOA_DATA}",
            "method.tasks.aoa.dataset.n=32",
            "method.tasks.aoa.method.batch_size=8",
            "method.tasks.aoa.method.epochs=1",
            "model.template.preset=aoa",  # the task's framing, in its pairs and evaluation too
            *(f"dataset.{o}" for o in ONPOLICY),
            *REAL_EVAL,
        ),
        real_keys=(
            "harmbench/compliance_rate",
            "jailbreak_dan/compliance_rate",
            "over_refusal/refusal_rate",
            "utility_mc/acc",
        ),
        dry=("+experiment=realign", "method.tasks.obey.dataset.n=64", *DRY),
        dry_keys=("harmful_obey/compliance_rate", "utility_obey/accuracy"),
    ),
}


@dataclass(frozen=True)
class Row:
    name: str
    study: str
    overrides: tuple[str, ...] = ()  # beside bf16-mixed on the GPU
    timeout_s: int = 150
    gpu_only: bool = False  # skipped by --dry-run


ROWS = (
    Row("fusion", "fusion"),
    Row("realign", "realign"),
    Row("fsdp2-1proc", "fusion", ("strategy=fsdp", "strategy.devices=1")),
    Row("fsdp1", "fusion", ("strategy=fsdp1", "strategy.devices=1"), gpu_only=True),
    Row("grad-ckpt", "fusion", ("model.gradient_checkpointing=true",)),
    Row("compiled", "fusion", ("model.compile_min_steps=0",), timeout_s=180),
)


@dataclass
class Result:
    row: Row
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    error: str = ""
    metrics: dict[str, float] = field(default_factory=dict)


def overrides(row: Row, dry_run: bool, reference: bool, extra: list[str]) -> list[str]:
    """The row's overrides: the reduced study, then the device settings (fp32 on the CPU for a reference), its own."""
    study = STUDIES[row.study]
    if reference:
        device = ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    else:
        device = [f"trainer.accelerator={'cpu' if dry_run else 'gpu'}", "trainer.precision=bf16-mixed", *row.overrides]
    return [*(study.dry if dry_run else study.real), *device, *extra, "trainer.enable_progress_bar=false"]


def error_line(stderr: str) -> str:
    """The line that says what went wrong: safety_lab's `error: …`, else the last exception a traceback or Hydra
    names, else the first line of Hydra's last message (a composition error)."""
    lines = stderr.splitlines()
    for line in lines:
        if line.startswith("error:"):
            return line
    raised = [line for line in lines if EXCEPTION.match(line)]
    if raised:
        return raised[-1]
    blocks = [b.strip() for b in re.split(r"\n\s*\n", stderr) if b.strip() and "HYDRA_FULL_ERROR" not in b]
    return blocks[-1].splitlines()[0] if blocks else "no error message"


def collect_metrics(run_dir: Path) -> dict[str, float]:
    """Every `metrics.json` under `run_dir` in one flat dict, keys prefixed by their folder below it (`weight=0/`)."""
    metrics = {}
    for path in sorted(run_dir.rglob("metrics.json")):
        folder = path.parent.relative_to(run_dir).as_posix()
        prefix = "" if folder == "." else f"{folder}/"
        metrics |= {f"{prefix}{key}": value for key, value in json.loads(path.read_text()).items()}
    return metrics


def run_row(row: Row, args: list[str], folder: Path, store: Path, keys: tuple, timeout_s: float | None) -> Result:
    """`python -m safety_lab <args>` into `folder/run`, with its own store (beside the shared kinds) and process group,
    killed whole after `timeout_s`; its command line and output are kept in `folder`."""
    folder.mkdir(parents=True)
    store.mkdir(parents=True)
    for kind in SHARED_KINDS:
        shared = store.parent / ".shared" / kind
        shared.mkdir(parents=True, exist_ok=True)
        (store / kind).symlink_to(shared)
    cmd = [sys.executable, "-m", "safety_lab", *args, f"hydra.run.dir={folder / 'run'}"]
    (folder / "command.txt").write_text(" ".join(cmd) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"} | {"SAFETY_LAB_STORE": str(store)}
    start = time.perf_counter()
    with open(folder / "stdout.txt", "w") as out, open(folder / "stderr.txt", "w") as err:
        child = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=err, start_new_session=True)
        try:
            code = child.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)  # compile workers and launched ranks too
            child.wait()
            return Result(row, "failed", time.perf_counter() - start, f"timed out after {timeout_s:.0f} s")
    seconds = time.perf_counter() - start
    if code:
        reason = f"killed by signal {-code}" if code < 0 else error_line((folder / "stderr.txt").read_text())
        return Result(row, "failed", seconds, reason)
    metrics = collect_metrics(folder / "run")
    missing = [key for key in keys if key not in metrics]
    if missing:
        return Result(row, "failed", seconds, f"metrics.json lacks {', '.join(missing)}", metrics)
    return Result(row, "ok", seconds, metrics=metrics)


def reference_key(study: str, dry_run: bool) -> str:
    return f"{study} (dry run)" if dry_run else study


def cell(metrics: dict, key: str) -> str:
    """`value [low, high]` of one metric, or `-`."""
    if key not in metrics:
        return "-"
    low, high = (metrics.get(key + end) for end in CI)
    return f"{metrics[key]:.3f}" + ("" if low is None else f" [{low:.3f}, {high:.3f}]")


def inside(value: float | None, reference: dict, key: str) -> str:
    """Whether `value` lies inside the reference's Wilson interval of `key`: yes / NO / - (nothing to compare)."""
    low, high = (reference.get(key + end) for end in CI)
    if value is None or low is None:
        return "-"
    return "yes" if low - 1e-9 <= value <= high + 1e-9 else "NO"  # Wilson's bound at a rate of 1 is 1 - ε


def table(results: list[Result], references: dict, dry_run: bool) -> str:
    """The check's table: a line per key metric of a row that ran, its status and seconds on the first; a row that
    failed or was skipped is one line with the reason."""
    lines = [("row", "status", "seconds", "metric", "this run", "CPU reference [95% CI]", "in CI")]
    for r in results:
        seconds = "-" if r.status == "skipped" else f"{r.seconds:.0f}"
        if r.status != "ok":
            lines.append((r.row.name, r.status, seconds, r.error))
            continue
        study = STUDIES[r.row.study]
        reference = references.get(reference_key(r.row.study, dry_run), {}).get("metrics", {})
        for i, key in enumerate(study.keys(dry_run)):
            head = (r.row.name, r.status, seconds) if i == 0 else ("", "", "")
            lines.append(
                (*head, key, cell(r.metrics, key), cell(reference, key), inside(r.metrics[key], reference, key))
            )
    widths = [max(len(line[i]) for line in lines if i < 3 or len(line) > 4) for i in range(7)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help=f"comma-separated, of {', '.join(r.name for r in ROWS)} (default: all)")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU with the synthetic tiny model")
    parser.add_argument("--reference", type=Path, default=REFERENCE, help="the CPU reference JSON to compare with")
    parser.add_argument("--record-reference", type=Path, metavar="FILE", help="run the studies on the CPU into FILE")
    parser.add_argument("--out", type=Path, help="keep each row's run folder and logs here (default: a temp dir)")
    parser.add_argument("--set", action="append", default=[], metavar="OVERRIDE", help="added to every row's command")
    parser.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for all rows (not for recording)")
    args = parser.parse_args(argv)

    import torch

    recording = args.record_reference is not None
    if not (args.dry_run or recording or torch.cuda.is_available()):
        print(NO_CUDA.format(torch.__version__))
        return 0
    names = args.rows.split(",") if args.rows else [r.name for r in ROWS]
    unknown = sorted(set(names) - {r.name for r in ROWS})
    if unknown:
        print(f"error: --rows={','.join(unknown)}: not one of {', '.join(r.name for r in ROWS)}", file=sys.stderr)
        return 2
    if args.out and args.out.exists() and any(args.out.iterdir()):
        print(f"error: --out={args.out}: exists and is not empty", file=sys.stderr)
        return 2
    rows = [r for r in ROWS if r.name in names]
    if recording:  # one CPU run per study: the device rows differ from it only in their device settings
        rows = [next(r for r in rows if r.study == study) for study in dict.fromkeys(r.study for r in rows)]
    where = (
        "the CPU (reference)" if recording else "the CPU (dry run)" if args.dry_run else torch.cuda.get_device_name()
    )
    print(f"gpu-check: {', '.join(r.name for r in rows)} on {where}, torch {torch.__version__}", flush=True)

    deadline = None if recording else time.perf_counter() + args.budget
    results = []
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        out = args.out or Path(tmp) / "runs"
        for row in rows:
            left = None if deadline is None else deadline - time.perf_counter()
            if args.dry_run and row.gpu_only and not recording:
                result = Result(row, "skipped", error="GPU only")
            elif left is not None and left < MIN_ROW_S:
                result = Result(row, "skipped", error=f"time budget: {max(left, 0):.0f} s left")
            else:
                result = run_row(
                    row,
                    overrides(row, args.dry_run, recording, args.set),
                    out / row.name,
                    Path(tmp) / "stores" / row.name,
                    STUDIES[row.study].keys(args.dry_run),
                    None if left is None else min(row.timeout_s, left),
                )
            results.append(result)
            print(f"  {row.name}: {result.status} {result.error}".rstrip(), flush=True)
    if recording:
        record_reference(args.record_reference, results, args.dry_run, args.set)
    references = json.loads(args.reference.read_text()) if args.reference.exists() else {}
    print(table(results, references, args.dry_run))
    if args.out:
        print(f"runs and logs: {args.out}")
    return 1 if any(r.status == "failed" for r in results) else 0


def record_reference(path: Path, results: list[Result], dry_run: bool, extra: list[str]) -> None:
    """Merge each study that ran into the reference file: its command and key metrics with their intervals."""
    import torch

    recorded = json.loads(path.read_text()) if path.exists() else {}
    for r in results:
        if r.status == "ok":
            keys = [key + end for key in STUDIES[r.row.study].keys(dry_run) for end in ("", *CI)]
            recorded[reference_key(r.row.study, dry_run)] = {
                "command": " ".join(["python -m safety_lab", *overrides(r.row, dry_run, True, extra)]),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
                "metrics": {k: r.metrics[k] for k in keys if k in r.metrics},
            }
    path.write_text(json.dumps(recorded, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
