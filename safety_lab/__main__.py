"""`python -m safety_lab +experiment=...`: compose the config, run the pipeline, print the run folder last."""
from __future__ import annotations

import sys
import warnings

import hydra
from omegaconf import DictConfig

from safety_lab.config import register
from safety_lab.errors import SafetyLabError

register()
# library deprecation notices (transformers, peft, Lightning) are not the user's to act on
warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from safety_lab.run import run  # heavy imports after composition, so config errors come back fast

    try:
        out = run(cfg)
    except SafetyLabError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(out)


if __name__ == "__main__":
    main()
