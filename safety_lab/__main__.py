"""`python -m safety_lab +experiment=...`: compose the config, run the pipeline, print the run folder last (and, for
an Optuna search, return the trial's value: safety_lab/search.py)."""

from __future__ import annotations

import json
import logging
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from safety_lab.artifacts import write_json_atomic
from safety_lab.config import check_choices, check_overrides, register
from safety_lab.errors import SafetyLabError
from safety_lab.search import check_search, objective

register()
# library deprecation notices (transformers, peft, Lightning) are not the user's to act on
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


def exit_with(error: SafetyLabError):
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from safety_lab.distributed import job_scope, use_job_command
    from safety_lab.run import run  # heavy imports after composition, so config errors come back fast

    use_job_command()  # ranks that DDP/FSDP launch re-run this job, not the sweep (safety_lab/distributed.py)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if cfg.get("search"):  # a search that cannot work would fail every trial alike: stop the sweep at once
        try:
            check_search(cfg.search, cfg.eval.suites)
        except SafetyLabError as e:
            exit_with(e)
    try:
        with job_scope():
            out = run(cfg)
    except Exception as e:
        if not multirun:
            if isinstance(e, SafetyLabError):
                exit_with(e)
            raise
        # one failed job must not stop a sweep: record it for the report (safety_lab.report) and go on
        logging.getLogger("safety_lab").error(f"job failed: {e}", exc_info=not isinstance(e, SafetyLabError))
        write_json_atomic(Path(cfg.paths.output_dir) / "failed.json", {"error": f"{type(e).__name__}: {e}"})
        return
    if out is None:  # ranks > 0 print nothing
        return None
    print(out)
    if cfg.get("search"):  # the trial's value for `hydra/sweeper=optuna`
        return objective(json.loads((out / "metrics.json").read_text()), cfg.search)
    return None


if __name__ == "__main__":
    try:
        check_choices(sys.argv[1:])  # an unknown option of a group (`defense=foo`): one line, before Hydra composes
        check_overrides(sys.argv[1:])  # any other composition error (`method.lr=abc`): one line too
    except SafetyLabError as e:
        exit_with(e)
    main()
