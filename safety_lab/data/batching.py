"""Training batches that do not depend on how training is parallelised, and that resume exactly.

Each epoch is one seeded permutation of the data cut into *global* batches of `micro_batch × accumulation ×
processes` rows; every rank takes its micro-batches from each global batch. So `single`, `ddp`, `fsdp` at equal
global batch, and batch 8 × accumulation 1 vs batch 1 × accumulation 8, see the same rows per optimiser step. Each
micro-batch carries `loss_normalizer` = (loss units in its global batch) / (accumulation × processes): a loss
*summed* over the micro-batch and divided by it gives, after Lightning's division by the accumulation and the
data-parallel gradient average, exactly the mean over the global batch (per labelled token for token rows),
whatever the split. With one process and no accumulation the order is the one `DataLoader(shuffle=True,
generator=seed)` gives.

`ResumeState` stores in every checkpoint how far the epoch had got and the RNG states, so a fit resumed from a
checkpoint continues with the very next micro-batch instead of restarting the epoch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset, Sampler

from safety_lab.data.collate import IGNORE


@dataclass(frozen=True)
class MicroBatch:
    indices: tuple[int, ...]
    loss_normalizer: float


def loss_units(data) -> list[int]:
    """What the loss averages over, per row: labelled next-token positions for (ids, labels) rows, else 1."""
    return [
        sum(label != IGNORE for label in row[1][1:]) if isinstance(row, tuple) and len(row) == 2 else 1
        for row in (data[i] for i in range(len(data)))
    ]


def process_group_size_and_rank() -> tuple[int, int]:
    """(processes in the default process group, this process's rank): (1, 0) outside one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def split_global_batch(indices: list[int], parts: int) -> list[list[int]] | None:
    """`indices` cut into `parts` contiguous, nearly equal slices; None when some slice would be empty."""
    if len(indices) < parts:
        return None
    return [chunk.tolist() for chunk in np.array_split(indices, parts)]


class GlobalBatchSampler(Sampler):
    """Yields this rank's `MicroBatch`es for the current epoch (see the module docstring)."""

    def __init__(self, units: list[int], micro_batch: int, accumulation: int, seed: int):
        self.units, self.micro_batch, self.accumulation, self.seed = units, micro_batch, accumulation, seed
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def permutation(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed)
        for _ in range(epoch + 1):  # the draws of a seeded shuffling DataLoader, epoch after epoch: a worker
            torch.empty((), dtype=torch.int64).random_(generator=generator)  # seed, the permutation, and the
            order = torch.randperm(len(self.units), generator=generator)  # RandomSampler's empty remainder
            torch.randperm(len(self.units), generator=generator)
        return order.tolist()

    def plan(self, epoch: int) -> list[MicroBatch]:
        size, rank = process_group_size_and_rank()
        slots = self.accumulation * size
        order, step = self.permutation(epoch), self.micro_batch * slots
        mine = []
        for start in range(0, len(order), step):
            parts = split_global_batch(order[start : start + step], slots)
            if parts is None:
                continue
            normalizer = max(1, sum(self.units[i] for part in parts for i in part)) / slots
            # slot a * size + rank: accumulation step a of this rank
            mine += [MicroBatch(tuple(parts[a * size + rank]), normalizer) for a in range(self.accumulation)]
        return mine

    def __len__(self) -> int:
        return len(self.plan(self.epoch))

    def __iter__(self):
        skip, self.skip = self.skip, 0
        yield from self.plan(self.epoch)[skip:]


class MicroBatches(Dataset):
    """Collates a `MicroBatch` of `data` with the data's own `collate`, adding its `loss_normalizer`."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, micro: MicroBatch) -> dict:
        batch = self.data.collate([self.data[i] for i in micro.indices])
        batch["loss_normalizer"] = torch.tensor(micro.loss_normalizer)
        return batch


def global_batch_loader(data, micro_batch: int, accumulation: int, seed: int) -> DataLoader:
    sampler = GlobalBatchSampler(loss_units(data), micro_batch, accumulation, seed)
    return DataLoader(MicroBatches(data), batch_size=None, sampler=sampler)


class ResumeState(Callback):
    """Saves the data position (epoch, micro-batches consumed) and the RNG states in each checkpoint; restores them
    when a fit resumes (the RNG right before the first resumed step, where the uninterrupted run had it)."""

    KEY = "safety_lab/resume"

    def __init__(self, sampler: GlobalBatchSampler):
        self.sampler = sampler
        self.rng: dict | None = None

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        numpy_state = np.random.get_state()
        checkpoint[self.KEY] = {
            "epoch": trainer.current_epoch,
            "consumed": trainer.fit_loop.epoch_loop.batch_progress.current.processed,
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            },
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        state = checkpoint.get(self.KEY)
        if state is None:
            return
        epoch, consumed = state["epoch"], state["consumed"]
        if consumed >= len(self.sampler):  # saved on the epoch's last batch: resume with the next epoch
            epoch, consumed = epoch + 1, 0
        self.sampler.set_epoch(epoch)
        self.sampler.skip = consumed
        self.rng = state["rng"]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.rng is None:
            return
        rng, self.rng = self.rng, None
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
        np.random.set_state((rng["numpy"][0], np.array(rng["numpy"][1], dtype=np.uint32), *rng["numpy"][2:]))
        if rng["cuda"]:
            torch.cuda.set_rng_state_all(rng["cuda"])
