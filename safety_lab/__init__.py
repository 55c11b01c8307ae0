"""safety_lab: Hydra + Lightning experiments on the safety of fine-tuned language models (docs/architecture.md).

OpenMP threads that wait for work sleep instead of spinning (unless the user set OMP_WAIT_POLICY): a spinning
thread holds its core, so next to one other busy process two-thread training fell to a third of its speed, sleeping
threads keep about half (bench/README.md, `contention`). Set here because OpenMP reads it once, when torch loads.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
