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
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]]
    order = sorted(range(len(prompts)), key=lengths.__getitem__)
    responses: list[str] = [""] * len(prompts)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        with eval_mode(model), torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
                batch = order[start:start + batch_size]
                inputs = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True,
                                   add_special_tokens=add_special_tokens).to(model.device)
                output = model.generate(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                        do_sample=False, use_cache=True, max_new_tokens=max_new_tokens,
                                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
                new_tokens = output[:, inputs["input_ids"].shape[1]:]
                for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                    responses[i] = text.strip()
    finally:
        tokenizer.padding_side = side
    return responses
