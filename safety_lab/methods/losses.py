"""Training losses as pure functions of logits and labels (unit-tested against hand computations)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from safety_lab.data.collate import IGNORE


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions whose label is not IGNORE (the SFT loss)."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)
