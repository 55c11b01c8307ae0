"""Padding-free training batches (`model.packing=true`): sequences packed into rows, a shared prompt computed once.

A micro-batch is a list of *units*: one (ids, labels) sequence for SFT, or a preference pair's chosen and rejected
sequences, which share the tokens of their longest common prefix (the prompt). A unit is laid out as that prefix
followed by each sequence's tail, every tail's positions restarting where the prefix ends; the units are packed
first-fit, longest first, into rows of the width that needs the fewest positions among the longest unit's length and
up to twice it (wider rows cost more attention), and a 4D mask lets each token see only the earlier
tokens of its own unit's prefix and its own tail (block-diagonal between units). So padding is computed only at the
end of a row, the prompt once per pair, and the output projection only at the positions that predict a labelled
token. `packed_logps` gives what `losses.sequence_logps` gives on the padded batch, up to rounding
(tests/test_packing.py). Single process only: it calls the decoder and the output projection directly.
"""

from __future__ import annotations

import os

import torch
from torch.utils.data import Dataset

from safety_lab.data.collate import IGNORE, TokenizedPreferences
from safety_lab.errors import SafetyLabError
from safety_lab.methods.losses import sequence_logps

Sequence = tuple[list[int], list[int]]  # (input ids, labels) of equal length, as `collate.join` makes them


def layout(unit: list[Sequence]) -> tuple[list[int], list[int], list[int], list[list[int]]]:
    """(ids, position ids, branch ids: 0 for the shared prefix, i + 1 for sequence i's tail, and per sequence the
    unit index of each of its tokens) of one unit."""
    every = [ids for ids, _ in unit]
    shared = len(os.path.commonprefix(every))  # the longest common prefix of the token lists
    ids, positions, branches, where = list(every[0][:shared]), list(range(shared)), [0] * shared, []
    for branch, seq in enumerate(every, 1):
        start, tail = len(ids), seq[shared:]
        ids += tail
        positions += range(shared, len(seq))
        branches += [branch] * len(tail)
        where.append(list(range(shared)) + list(range(start, start + len(tail))))
    return ids, positions, branches, where


def first_fit(sizes: list[int], width: int) -> list[list[int]]:
    """Unit numbers per row: each unit, longest first, in the first row with room for it."""
    rows, room = [], []
    for u in sorted(range(len(sizes)), key=lambda u: -sizes[u]):
        r = next((r for r, free in enumerate(room) if free >= sizes[u]), len(rows))
        if r == len(rows):
            rows.append([])
            room.append(width)
        rows[r].append(u)
        room[r] -= sizes[u]
    return rows


def pack(units: list[list[Sequence]], pad_id: int) -> dict[str, torch.Tensor | int]:
    """The packed batch of `units`: input_ids, position_ids, attention_mask [rows, 1, width, width] (True: may
    attend), targets [labelled tokens, 4] = (row, column of the position predicting it, the token, its sequence) and
    `sequences`. Sequence i of unit u is number u + i·len(units), so pairs come out as (chosen...; rejected...)."""
    layouts = [layout(unit) for unit in units]
    sizes = [len(ids) for ids, *_ in layouts]
    longest = max(sizes)
    widths = range(longest, 2 * longest + 1, max(1, longest // 4))
    width, rows = min(((w, first_fit(sizes, w)) for w in widths), key=lambda fit: fit[0] * len(fit[1]))
    ids, positions, branches, owners, targets = [], [], [], [], []
    for r, members in enumerate(rows):
        row_ids, row_positions, row_branches, row_owners = [], [], [], []
        for u in members:
            unit_ids, unit_positions, unit_branches, where = layouts[u]
            column = len(row_ids)
            for i, ((_, labels), index) in enumerate(zip(units[u], where)):
                sequence = u + i * len(units)
                targets += [
                    (r, column + index[k - 1], label, sequence)
                    for k, label in enumerate(labels)
                    if k and label != IGNORE
                ]
            row_ids += unit_ids
            row_positions += unit_positions
            row_branches += unit_branches
            row_owners += [u] * len(unit_ids)
        pad = width - len(row_ids)  # padding is a unit of its own (-1): each pad token sees the pads before it
        ids.append(row_ids + [pad_id] * pad)
        positions.append(row_positions + list(range(pad)))
        branches.append(row_branches + [0] * pad)
        owners.append(row_owners + [-1] * pad)
    owner, branch = torch.tensor(owners), torch.tensor(branches)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    same_unit = owner[:, :, None] == owner[:, None, :]
    visible_branch = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
    return {
        "input_ids": torch.tensor(ids),
        "position_ids": torch.tensor(positions),
        "attention_mask": (same_unit & visible_branch & causal).unsqueeze(1),
        "targets": torch.tensor(targets, dtype=torch.long).view(-1, 4),
        "sequences": sum(len(unit) for unit in units),
    }


LOGIT_CHUNK = 1024  # positions whose logits are computed at once


def label_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def packed_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's labelled tokens, how many there are) of a `pack`ed batch, under
    `model` (a causal LM, or a peft model around one)."""
    mask = batch["attention_mask"]
    if model.config._attn_implementation == "eager":  # eager attention adds the mask to its scores
        dtype = model.get_input_embeddings().weight.dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
    hidden = model.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"], use_cache=False
    ).last_hidden_state
    row, column, token, sequence = batch["targets"].T
    head, predicting = model.get_output_embeddings(), hidden[row, column]
    token_logps = torch.cat(  # in chunks: without autograd (the reference pass) only one chunk's logits live
        [
            label_logps(head(states).float(), labels)
            for states, labels in zip(predicting.split(LOGIT_CHUNK), token.split(LOGIT_CHUNK))
        ]
    )
    summed = token_logps.new_zeros(batch["sequences"]).index_add(0, sequence, token_logps)
    return summed, torch.bincount(sequence, minlength=batch["sequences"])


def sequences(batch: dict) -> int:
    """How many sequences a padded or packed batch holds (a packed row holds several): the `batch_size` its logged
    values are weighed by in an epoch's mean."""
    return batch["sequences"] if "targets" in batch else batch["input_ids"].shape[0]


def batch_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed log-probability of each sequence's labelled tokens, how many there are) of a padded or packed batch."""
    if "targets" in batch:
        return packed_logps(model, batch)
    return sequence_logps(
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, batch["labels"]
    )


class Packed(Dataset):
    """`data` (TokenizedExamples or TokenizedPreferences) with batches `pack`ed: an example is a unit, a pair's
    chosen and rejected rows are one; a preference batch keeps its pair indices."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.data[i]

    def __getattr__(self, name: str):  # fingerprint, length, pad_id, rows: the wrapped data's
        return getattr(self.__dict__["data"], name)

    def collate(self, rows) -> dict:
        if isinstance(self.data, TokenizedPreferences):
            batch = pack([[chosen, rejected] for _, chosen, rejected in rows], self.data.pad_id)
            batch["index"] = torch.tensor([i for i, _, _ in rows])
            return batch
        return pack([[row] for row in rows], self.data.pad_id)


def packed_if(cfg, data):
    """`data` packed when the run says `model.packing=true` (one process only), else as it is."""
    if not cfg.model.get("packing", False):
        return data
    strategy = cfg.strategy
    if strategy.strategy != "auto" or strategy.devices * strategy.num_nodes != 1:
        raise SafetyLabError(
            f"model.packing=true trains in one process; strategy.strategy={strategy.strategy} runs "
            f"{strategy.devices * strategy.num_nodes}: use strategy=single or model.packing=false"
        )
    return Packed(data)


def refuse_packing(cfg, method: str) -> None:
    """One line when the run says `model.packing=true` to a method whose batches are never packed, which would
    otherwise train unpacked without a word."""
    if cfg.model.get("packing", False):
        raise SafetyLabError(
            f"model.packing=true: method={method} does not pack its batches (SFT's and the preference methods' "
            "do); set model.packing=false"
        )
