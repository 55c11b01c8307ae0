"""Evaluate every saved checkpoint of a stage on the configured suites, into one table and one figure:

    python -m safety_lab.evaluate_checkpoints RUN_OR_STORE_DIR [overrides]

Every `*.ckpt` file under the folder is evaluated: the steps a run kept with `eval.during_training.save_checkpoints`
(`<run>/checkpoints/<stage>-<kind>-<hash>/step=<step>.ckpt`, beside a `stage.json` naming the stage's method and
base), or the store's checkpoints of a stage still being built (`<store>/<kind>/.ckpt-<hash>/<stage>/last.ckpt`).
The config is composed as for a run: for a run folder (or a folder inside one) the run's own overrides
(`.hydra/overrides.yaml`) first, then the ones given here (`+experiment=...` is needed for a store folder). The
model is the run's base with the stage's method (its LoRA adapter, or full weights) and each checkpoint's weights
loaded; it is evaluated on the suites of `eval.during_training` (all of `eval.suites` unless it names some, each cut
to its first `eval.during_training.n` prompts) with the run's judge and the same metrics as during training, so a
checkpoint's row equals the curve's at its step.

Written into `<run>/checkpoint_evaluation/` (or, for a folder outside a run, `outputs/checkpoint_evaluation/<time>/`;
`hydra.run.dir=DIR` chooses): `checkpoints.csv` (one row per checkpoint: stage, checkpoint, step, every metric with
its interval), `checkpoints.md` (the table, also printed) and `checkpoints.png` (metric vs step). The folder is
printed last. Bad inputs (no such folder, a folder without checkpoints, an unknown suite, a checkpoint that does not
fit the model) are one `error:` line and exit 2.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from omegaconf import OmegaConf

from safety_lab.errors import SafetyLabError

log = logging.getLogger("safety_lab.evaluate_checkpoints")
USAGE = "usage: python -m safety_lab.evaluate_checkpoints RUN_OR_STORE_DIR [overrides]"
OUT = "checkpoint_evaluation"


def checkpoint_groups(root: Path) -> dict[Path, list[Path]]:
    """{folder: its *.ckpt files} under `root` (a stage's checkpoints share a folder)."""
    if not root.is_dir():
        raise SafetyLabError(f"{root} " + ("is not a folder" if root.exists() else "does not exist") + f" ({USAGE})")
    groups: dict[Path, list[Path]] = {}
    for path in sorted(root.rglob("*.ckpt")):
        if path.is_file():
            groups.setdefault(path.parent, []).append(path)
    if not groups:
        raise SafetyLabError(f"no checkpoints (*.ckpt) under {root}")
    return groups


def run_folder(root: Path) -> Path | None:
    """The run folder `root` is or lies in (the one holding `.hydra/overrides.yaml`), if any."""
    return next((p for p in (root, *root.parents) if (p / ".hydra" / "overrides.yaml").is_file()), None)


def compose_config(overrides: list[str], out: Path | None):
    """The run config composed from conf/ with `overrides`, every interpolation resolved (as a run would), and the
    output folder."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict, read_write

    from safety_lab.config import register

    register()
    conf = Path(__file__).resolve().parents[1] / "conf"
    try:
        with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
            cfg = compose("config", overrides=overrides, return_hydra_config=True)
    except Exception as e:  # hydra's composition errors: a bad override, an unknown choice, a wrong type
        raise SafetyLabError(" ".join(str(e).split("\n")[:2])) from None
    cfg.hydra.runtime.cwd = os.getcwd()
    cfg.hydra.runtime.output_dir = "."
    HydraConfig.instance().set_config(cfg)
    try:
        chosen = any(o.startswith("hydra.run.dir=") for o in overrides)
        if chosen:
            out = Path(cfg.hydra.run.dir)
        elif out is None:
            out = Path(cfg.paths.root) / "outputs" / OUT / f"{datetime.now():%Y-%m-%d_%H-%M-%S}"
        with read_write(cfg.hydra):
            cfg.hydra.runtime.output_dir = str(out)
        with open_dict(cfg):
            del cfg["hydra"]
        resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    finally:
        HydraConfig.instance().cfg = None
    return resolved, out


def load_weights(model, path: Path, method: dict, base_id: str) -> int | None:
    """The trained weights of checkpoint `path` loaded into `model`; returns its step."""
    import torch

    from safety_lab.checkpoints import check_torch_file

    check_torch_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    state = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    if not state:
        raise SafetyLabError(f"{path}: holds no state_dict (not a Lightning or safety_lab checkpoint)")
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    own = dict(model.state_dict())
    unknown = [k for k in weights if k not in own]
    wrong = [k for k in weights if k in own and own[k].shape != weights[k].shape]
    if not weights or unknown or wrong:
        bad = (unknown + wrong + ["no model weights"])[0]
        raise SafetyLabError(
            f"{path}: does not fit method {method.get('name')} on {base_id} ({bad}); pass the run's overrides"
        )
    model.load_state_dict(weights, strict=False)
    return checkpoint.get("global_step")


def markdown(rows: list[dict]) -> str:
    from safety_lab.eval.during_training import curve_keys

    keys = curve_keys(rows)

    def cell(row: dict, key: str) -> str:
        if key not in row:
            return "-"
        low, high = row.get(f"{key}_ci_low"), row.get(f"{key}_ci_high")
        return f"{row[key]:.3f}" + (f" [{low:.2f}, {high:.2f}]" if low is not None else "")

    lines = ["| stage | checkpoint | step | " + " | ".join(keys) + " |", "|---|---|---:|" + "---:|" * len(keys)]
    for row in rows:
        cells = [row["stage"], row["checkpoint"], str(row["step"]), *(cell(row, k) for k in keys)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_checkpoints(root: Path, overrides: list[str]) -> Path:
    groups = checkpoint_groups(root)
    run = run_folder(root)
    given = list(OmegaConf.load(run / ".hydra" / "overrides.yaml")) if run else []
    given = [o for o in given if not o.lstrip("+~").startswith("hydra.")] + overrides
    cfg, out = compose_config(given, run / OUT if run else None)

    import torch

    from safety_lab.config import check_values, plain
    from safety_lab.distributed import job_threads
    from safety_lab.eval.during_training import STAGE_FILE, check_settings, chosen_suites, draw, suite_evaluation
    from safety_lab.eval.during_training import write_table as write_csv
    from safety_lab.eval.judges import build_judge
    from safety_lab.models.lora import trainable
    from safety_lab.sources import load_suites
    from safety_lab.stages import Stages

    check_values(cfg)
    try:
        judge = build_judge(cfg.eval.judge, **cfg.eval.judge_args)
    except (TypeError, ValueError) as e:
        raise SafetyLabError(f"eval.judge: {e}") from e
    check_settings(cfg.eval, judge.labels)
    torch.set_num_threads(job_threads(cfg))
    stages = Stages(cfg)
    suites = chosen_suites(cfg.eval, load_suites(cfg.eval, stages.world))
    base = stages.base()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    max_new_tokens = cfg.eval.max_new_tokens or stages.world.spec.max_len + 2
    rows = []
    for folder, paths in groups.items():
        info = json.loads((folder / STAGE_FILE).read_text()) if (folder / STAGE_FILE).is_file() else {}
        method = info.get("method") or plain(cfg.method)
        if info.get("base") and info["base"] != base.id:
            raise SafetyLabError(
                f"{folder}: trained on {info['base']}, but the composed config's base is {base.id}; "
                "pass the run's overrides"
            )
        model = trainable(copy.deepcopy(base.model), method.get("lora"))
        stage = info.get("entry") or (str(folder.relative_to(root)) if folder != root else root.name)
        for path in paths:
            step = load_weights(model, path, method, base.id)
            metrics = suite_evaluation(
                model.to(device), base.tokenizer, suites, judge, stages.template, max_new_tokens, cfg.eval.batch_size
            )
            log.info("%s %s (step %s) evaluated", stage, path.name, step)
            rows.append({"stage": stage, "checkpoint": path.name, "step": step, **metrics})
        model.cpu()
    rows.sort(key=lambda r: (r["stage"], r["step"] if r["step"] is not None else -1))
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "checkpoints.csv", rows)
    table = markdown(rows)
    (out / "checkpoints.md").write_text(table)
    drawn = [r for r in rows if r["step"] is not None]
    if drawn:
        draw(drawn, out / "checkpoints.png", group="stage", title="evaluation of saved checkpoints")
    print(table)
    return out


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(levelname)s %(name)s] %(message)s")
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        print(f"error: which folder? ({USAGE})", file=sys.stderr)
        return 2
    try:
        out = evaluate_checkpoints(Path(argv[0]), argv[1:])
    except SafetyLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
