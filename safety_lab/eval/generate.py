"""Batched greedy generation: the "generate" step of evaluation (and of on-policy pairs).

Prompts are padded on the left so every row's next token sits in the last column and decoded with the KV cache.
Three levers, each a setting (`eval.generation`), leave every greedy token unchanged (tests/test_generate.py):

- `group_by_length`: batches of prompts of similar token length (sorted), so little padding is computed;
- `drop_finished`: our own decode loop, in which a row that emitted EOS leaves the batch and the KV cache
  (`DynamicCache.batch_select_indices`), so the last long answers are not decoded beside finished ones;
  off, each batch goes through HF `generate`, which keeps decoding finished rows until all are done;
- `padding_free_prefill` (in our loop): each run of equal-length prompts is prefilled alone, without padding, and the
  runs' caches are left-padded into the decode batch, so a few long prompts do not pad every short one to their length.

Responses come back in the prompts' original order.
"""

from __future__ import annotations

from functools import partial
from itertools import groupby

import torch
import torch.nn.functional as F
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
    padding_free_prefill: bool = True,
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
    decode = partial(greedy, padding_free_prefill=padding_free_prefill) if drop_finished else hf_greedy
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


def padded_prefill(model, rows: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """(last-position logits, KV cache, attention mask) of `rows` left-padded into one batch: HF `generate`'s inputs
    (position ids from the attention mask, pads at position 0)."""
    input_ids, mask = left_padded(model, rows, pad_token_id)
    cache = DynamicCache(config=model.config)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    ).logits
    return logits[:, -1], cache, mask


def unpadded_prefill(
    model, rows: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, DynamicCache, torch.Tensor]:
    """`padded_prefill`'s result, each run of equal-length rows prefilled without padding (no mask, positions from 0)
    and its cache rows left-padded with zeros to the longest row (the mask hides them, as it hides the pads' keys)."""
    width = max(map(len, rows))
    by_length = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    logits, caches = [], []
    for length, run in groupby(by_length, key=lambda i: len(rows[i])):
        cache = DynamicCache(config=model.config)
        input_ids = torch.tensor([rows[i] for i in run], device=model.device)
        logits.append(model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1])
        left = (0, 0, width - length, 0)  # zeros before the run's positions
        caches.append([(F.pad(k, left), F.pad(v, left)) for k, v, _ in cache])
    back = torch.tensor(by_length, device=model.device).argsort()  # row i's place among the runs' rows
    layers = [[torch.cat(kv)[back] for kv in zip(*layer)] for layer in zip(*caches)]
    _, mask = left_padded(model, rows, pad_token_id)
    return torch.cat(logits)[back], DynamicCache(layers, config=model.config), mask


def greedy(
    model, rows: list[list[int]], max_new_tokens: int, tokenizer, padding_free_prefill: bool = True
) -> list[list[int]]:
    """The new tokens of each row (up to and including its EOS) by a KV-cached greedy loop from which finished rows
    leave: the inputs HF `generate` gives the model (position ids from the attention mask, logits of the last
    column only), on the rows still decoding; the prompts prefilled without padding if `padding_free_prefill`."""
    prefill = unpadded_prefill if padding_free_prefill else padded_prefill
    logits, cache, mask = prefill(model, rows, tokenizer.pad_token_id)
    positions = mask.sum(-1, keepdim=True) - 1  # each row's last position
    live = torch.arange(len(rows), device=model.device)  # the batch rows still decoding
    new_tokens: list[list[int]] = [[] for _ in rows]
    eos = tokenizer.eos_token_id
    for step in range(max_new_tokens):
        tokens = logits.argmax(-1)
        for row, token in zip(live.tolist(), tokens.tolist()):
            new_tokens[row].append(token)
        going = tokens != eos
        if step == max_new_tokens - 1 or not going.any():
            break
        if not going.all():  # the finished rows leave the batch and the cache
            kept = going.nonzero().squeeze(1)
            cache.batch_select_indices(kept)
            live, tokens, mask, positions = live[kept], tokens[kept], mask[kept], positions[kept]
        positions, mask = positions + 1, torch.cat([mask, mask.new_ones(len(live), 1)], dim=-1)
        logits = model(
            input_ids=tokens[:, None], attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
        ).logits[:, -1]
    return new_tokens
