"""Batched greedy generation: the "generate" step of evaluation (and of on-policy pairs).

Prompts are padded on the left so every row's next token sits in the last column and decoded with the KV cache.
Two levers, each a setting (`eval.generation`), leave every greedy token unchanged (tests/test_generate.py):

- `group_by_length`: batches of prompts of similar token length (sorted), so little padding is computed;
- `drop_finished`: our own decode loop, in which a row that emitted EOS leaves the batch and the KV cache
  (`DynamicCache.batch_select_indices`), so the last long answers are not decoded beside finished ones;
  off, each batch goes through HF `generate`, which keeps decoding finished rows until all are done.

Responses come back in the prompts' original order.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from safety_lab.data.collate import pad
from safety_lab.models.factory import eval_mode


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
    progress: bool = True,
    add_special_tokens: bool = True,
    group_by_length: bool = True,
    drop_finished: bool = True,
) -> list[str]:
    """Greedy responses (new tokens only, special tokens dropped, stripped) to fully formatted prompts.

    `add_special_tokens=False` for prompts rendered by a chat template, which writes its own BOS.
    """
    if not prompts:
        return []
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]  # once: lengths and batches
    order = list(range(len(prompts)))
    if group_by_length:
        order.sort(key=lambda i: len(encoded[i]))
    decode = greedy if drop_finished else hf_greedy
    responses: list[str] = [""] * len(prompts)
    with eval_mode(model), torch.inference_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress):
            batch = order[start : start + batch_size]
            new_tokens = decode(model, [encoded[i] for i in batch], max_new_tokens, tokenizer)
            for i, text in zip(batch, tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                responses[i] = text.strip()
    return responses


def left_padded(model, rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, attention mask) of `rows`, padded on the left, on the model's device."""
    input_ids = pad(rows, pad_token_id, left=True).to(model.device)
    return input_ids, pad([[1] * len(row) for row in rows], 0, left=True).to(model.device)


def hf_greedy(model, rows: list[list[int]], max_new_tokens: int, tokenizer) -> list[list[int]]:
    """The new tokens of each row by HF `generate` on the whole batch (finished rows padded to the end)."""
    input_ids, attention_mask = left_padded(model, rows, tokenizer.pad_token_id)
    output = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        use_cache=True,
        max_new_tokens=max_new_tokens,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return output[:, input_ids.shape[1] :].tolist()


def greedy(model, rows: list[list[int]], max_new_tokens: int, tokenizer) -> list[list[int]]:
    """The new tokens of each row (up to and including its EOS) by a KV-cached greedy loop from which finished rows
    leave: the inputs HF `generate` gives the model (position ids from the attention mask, logits of the last
    column only), on the rows still decoding."""
    input_ids, mask = left_padded(model, rows, tokenizer.pad_token_id)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # pads get position 0, as in HF generate
    cache = DynamicCache(config=model.config)
    live = torch.arange(len(rows), device=model.device)  # the batch rows still decoding
    new_tokens: list[list[int]] = [[] for _ in rows]
    eos = tokenizer.eos_token_id
    for step in range(max_new_tokens):
        logits = model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits
        tokens = logits[:, -1].argmax(-1)
        for row, token in zip(live.tolist(), tokens.tolist()):
            new_tokens[row].append(token)
        going = tokens != eos
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # the finished rows leave the batch and the cache
            kept = going.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, tokens, mask, positions = live[kept], tokens[kept], mask[kept], positions[kept]
        input_ids, positions = tokens[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
    return new_tokens
