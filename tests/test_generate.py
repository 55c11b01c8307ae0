"""The generator's levers (eval.generation) leave every greedy token unchanged: batches grouped by length, a decode
loop that finished rows leave and its padding-free prefill give HF `generate`'s tokens, on a tiny random Llama whose
answers stop at varied steps."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from test_eval import model, prompts  # noqa: F401 (fixtures: the tiny random Llama and 20 prompts of 3..22 words)

from safety_lab.eval.generate import generate, greedy, hf_greedy

NEW = 12


@pytest.fixture(scope="module")
def stopping(model, tokenizer, prompts):  # noqa: F811
    """test_eval's random Llama with EOS's output row 1.05x the row of the token it generates most after the first:
    wherever that token would win, EOS does, so answers stop after 1..11 tokens or run to the limit."""
    stopping = copy.deepcopy(model).eval()
    with torch.inference_mode():
        plain = hf_greedy(stopping, tokenizer(prompts)["input_ids"], NEW, tokenizer)
    frequent = Counter(t for row in plain for t in row[1:]).most_common(1)[0][0]
    with torch.no_grad():
        stopping.lm_head.weight[tokenizer.eos_token_id] = 1.05 * stopping.lm_head.weight[frequent]
    return stopping


@pytest.mark.parametrize("padding_free_prefill", [True, False])
def test_finished_rows_leave_the_batch_with_hf_generates_tokens(
    stopping,
    tokenizer,
    prompts,  # noqa: F811
    padding_free_prefill,
):
    rows = tokenizer(prompts)["input_ids"]
    assert max(Counter(map(len, rows)).values()) == 3  # the unpadded prefill has runs of 1, 2 and 3 equal lengths
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    with torch.inference_mode():
        ours = greedy(stopping, rows, NEW, tokenizer, padding_free_prefill)
        plain = hf_greedy(stopping, rows, NEW, tokenizer)
    lengths = [len(r) for r in ours]
    assert len(set(lengths)) >= 4 and min(lengths) == 1 and max(lengths) == NEW  # rows finish at varied steps
    assert sum(n < NEW for n in lengths) >= 5 and sum(n == NEW for n in lengths) >= 5
    for mine, theirs, n in zip(ours, plain, lengths):
        assert mine == theirs[:n] and len(theirs) == NEW  # HF keeps decoding the row: padding after its EOS
        assert (mine[-1] == eos and theirs[n:] == [pad] * (NEW - n)) if n < NEW else eos not in mine


@pytest.mark.parametrize("group_by_length", [True, False])
@pytest.mark.parametrize("drop_finished", [True, False])
@pytest.mark.parametrize("padding_free_prefill", [True, False])  # our loop's prefill: no effect on HF generate
def test_levers_leave_every_response_unchanged(
    stopping,
    tokenizer,
    prompts,  # noqa: F811
    group_by_length,
    drop_finished,
    padding_free_prefill,
):
    def answers(batch_size: int, **levers) -> list[str]:
        return generate(stopping, tokenizer, prompts, NEW, batch_size, progress=False, **levers)

    plain = answers(4, group_by_length=False, drop_finished=False)  # HF generate on batches in the given order
    levers = dict(
        group_by_length=group_by_length, drop_finished=drop_finished, padding_free_prefill=padding_free_prefill
    )
    assert answers(4, **levers) == plain
    assert answers(1, group_by_length=False, drop_finished=False) == plain  # one prompt at a time
    assert "" in plain and len(set(plain)) > 10  # some answers are EOS at once, most differ
