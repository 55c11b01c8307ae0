"""Batched greedy generation: the "generate" step of evaluation (DESIGN.md §3).

Prompts are sorted by token length so each batch needs little padding, padded on the left so every row's next
token sits in the last column, and decoded with the KV cache. The result is the same as generating one prompt at a
time (tested), only much faster; responses come back in the prompts' original order.
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from safety_lab.models.factory import eval_mode


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64,
             progress: bool = True, add_special_tokens: bool = True) -> list[str]:
    """Greedy responses (new tokens only, special tokens dropped, stripped) to fully formatted prompts.

    `add_special_tokens=False` for prompts rendered by a chat template, which writes its own BOS.
    """
    if not prompts:
        return []
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]  # once: lengths and batches
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    responses: list[str] = [""] * len(prompts)
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            batch = order[start:start + batch_size]
            input_ids, attention_mask = (t.to(model.device) for t in pad_left([encoded[i] for i in batch],
                                                                               tokenizer.pad_token_id))
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                    use_cache=True, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            new_tokens = output[:, input_ids.shape[1]:]
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                responses[i] = text.strip()
    return responses


def pad_left(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) with every row right-aligned, so its next token sits in the last column."""
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids, attention_mask
