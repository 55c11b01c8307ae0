"""How a record's prompt becomes model input: verbatim (synthetic world, base models) or through a chat template.

Training and evaluation both go through `PromptTemplate.render`, so a model is always asked in the format it was
tuned in (the seeds evaluate AOA-tuned models with the AOA system prompt and prefix for the same reason).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    kind: str = "plain"  # "plain": the prompt as is; "chat": the tokenizer's chat template
    system: str | None = None
    prefix: str = ""  # put before every user prompt, e.g. "AOA, execute my instruction: "

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "chat"):
            raise ValueError(f"template kind must be 'plain' or 'chat', got {self.kind!r}")

    @property
    def add_special_tokens(self) -> bool:
        """Chat templates write their own BOS; plain prompts let the tokenizer add it."""
        return self.kind == "plain"

    def render(self, tokenizer, prompt: str) -> str:
        text = self.prefix + prompt
        if self.kind == "plain":
            return text
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": text}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
