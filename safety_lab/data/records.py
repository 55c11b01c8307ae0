"""The record shapes every dataset — synthetic or real — is turned into.

`Example` feeds supervised fine-tuning, `Preference` feeds DPO and unlearning, `UnpairedPreference` (one completion
labelled desirable or not, TRL's unpaired layout) feeds KTO, `Probe` is one evaluation prompt.
Prompts are plain strings; a model's prompt template (chat template, AOA system prompt...) is applied later, in one
place, so training and evaluation always format the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str


@dataclass(frozen=True)
class Preference:
    prompt: str
    chosen: str
    rejected: str


@dataclass(frozen=True)
class UnpairedPreference:
    prompt: str
    completion: str
    desirable: bool


@dataclass(frozen=True)
class Probe:
    prompt: str
    unsafe: bool  # the ground truth (synthetic oracle) or the dataset's label
    target: str | None = None  # the exact compliant response, where one exists (synthetic world)
    meta: dict = field(default_factory=dict, compare=False)
    opening: str | None = None  # the text a compliant answer starts with (a file suite's `opening`: a persona's)
