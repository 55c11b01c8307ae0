"""Tokenise records once, up front, and pad them into training batches.

Labels are -100 on prompt tokens (unless `train_on_prompt`) and on padding, so the loss only sees the response
and its closing EOS, as in every seed codebase. Preference pairs batch as [chosen rows; rejected rows] along the
batch dimension, so one forward pass scores both (as TRL and torchtune do).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from safety_lab.data.records import Example, Preference
from safety_lab.data.template import PromptTemplate

IGNORE = -100


def tokenize_prompts(tokenizer, template: PromptTemplate, prompts: Sequence[str]) -> list[list[int]]:
    texts = [template.render(tokenizer, p) for p in prompts]
    return tokenizer(texts, add_special_tokens=template.add_special_tokens)["input_ids"]


def tokenize_responses(tokenizer, responses: Sequence[str]) -> list[list[int]]:
    return [ids + [tokenizer.eos_token_id] for ids in tokenizer(list(responses), add_special_tokens=False)["input_ids"]]


def join(prompt: list[int], response: list[int], max_length: int, train_on_prompt: bool = False):
    """input ids and labels of prompt+response, the prompt cut from the left if the pair is too long."""
    prompt = prompt[max(0, len(prompt) + len(response) - max_length) :]
    ids = (prompt + response)[:max_length]
    labels = (list(prompt) if train_on_prompt else [IGNORE] * len(prompt)) + response
    return ids, labels[:max_length]


class TokenizedExamples(Dataset):
    def __init__(
        self,
        examples: Sequence[Example],
        tokenizer,
        template: PromptTemplate = PromptTemplate(),
        max_length: int = 512,
        train_on_prompt: bool = False,
    ):
        prompts = tokenize_prompts(tokenizer, template, [e.prompt for e in examples])
        responses = tokenize_responses(tokenizer, [e.response for e in examples])
        self.rows = [join(p, r, max_length, train_on_prompt) for p, r in zip(prompts, responses)]
        self.pad_id = tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]

    def collate(self, rows) -> dict[str, torch.Tensor]:
        return pad_right(rows, self.pad_id)


class TokenizedPreferences(Dataset):
    """(index, chosen row, rejected row) per pair; `collate` stacks chosen then rejected and keeps the indices, by
    which cached reference log-probs are looked up."""

    def __init__(
        self, pairs: Sequence[Preference], tokenizer, template: PromptTemplate = PromptTemplate(), max_length: int = 512
    ):
        prompts = tokenize_prompts(tokenizer, template, [p.prompt for p in pairs])
        chosen = tokenize_responses(tokenizer, [p.chosen for p in pairs])
        rejected = tokenize_responses(tokenizer, [p.rejected for p in pairs])
        self.rows = [
            (i, join(p, c, max_length), join(p, r, max_length))
            for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected))
        ]
        self.pad_id = tokenizer.pad_token_id

    @property
    def fingerprint(self) -> str:
        """Hash of the tokenised pairs: equal data gives equal cached reference log-probs."""
        return hashlib.sha256(json.dumps([row[1:] for row in self.rows]).encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int):
        return self.rows[i]

    def length(self, i: int) -> int:
        """The padded width pair `i` needs: its longer row."""
        _, (chosen, _), (rejected, _) = self.rows[i]
        return max(len(chosen), len(rejected))

    def collate(self, rows) -> dict[str, torch.Tensor]:
        batch = pad_right([c for _, c, _ in rows] + [r for _, _, r in rows], self.pad_id)
        batch["index"] = torch.tensor([i for i, _, _ in rows])
        return batch


def pad(seqs, fill: int, left: bool = False) -> torch.Tensor:
    """[rows, longest] token tensor: each row padded with `fill` on the right (or the left), built in one call."""
    width = max(len(s) for s in seqs)
    return torch.tensor(
        [[fill] * (width - len(s)) + list(s) if left else list(s) + [fill] * (width - len(s)) for s in seqs],
        dtype=torch.long,
    )


def pad_right(rows, pad_id: int) -> dict[str, torch.Tensor]:
    """A training batch of (ids, labels) rows: ids and labels of a row have the same length (`join`)."""
    ids = [ids for ids, _ in rows]
    return {
        "input_ids": pad(ids, pad_id),
        "attention_mask": pad([[1] * len(s) for s in ids], 0),
        "labels": pad([labels for _, labels in rows], IGNORE),
    }
