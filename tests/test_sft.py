"""Supervised fine-tuning: the loss against hand computations, label masking, padding, the LR schedule, and a
short real training run of `SFTModule` under a Lightning Trainer that must cut the loss.

The label layout is what decides what a safety adapter learns (only the response, never the prompt, unless asked),
so it is checked token by token on the synthetic world's word-level tokenizer, where every word is one token.
"""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch

from safety_lab.data.collate import IGNORE, TokenizedExamples, join, pad, pad_right
from safety_lab.data.records import Example
from safety_lab.data.template import PromptTemplate
from safety_lab.methods.losses import token_cross_entropy
from safety_lab.methods.sft import SFTModule, warmup_cosine
from safety_lab.models.factory import load_pretrained, tiny_llama
from safety_lab.models.lora import attach_lora
from safety_lab.worlds.synthetic import views

log = math.log


# ---- the loss -------------------------------------------------------------------------------------------------
def test_token_cross_entropy_matches_hand_computation():
    # vocab 3; logits are log-probabilities, so log-softmax returns them unchanged
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [log(1 / 2), log(1 / 4), log(1 / 4)], [100.0, -100.0, 5.0]],
            [[9.0, -9.0, 0.0], [log(0.1), log(0.2), log(0.7)], [0.0, 0.0, 0.0]],
        ]
    )
    labels = torch.tensor(
        [
            [IGNORE, 2, 0],  # position 0 predicts 2 (p=1/3), position 1 predicts 0 (p=1/2)
            [5, IGNORE, 2],  # label 0 is never a target; position 1 predicts 2 (p=0.7)
        ]
    )
    # the mean is over supervised tokens of the whole batch, not a mean of per-row means; the last position's
    # logits predict nothing
    expected = (log(3) + log(2) - log(0.7)) / 3
    assert token_cross_entropy(logits, labels).item() == pytest.approx(expected, abs=1e-6)
    assert token_cross_entropy(logits[:1], labels[:1]).item() == pytest.approx(log(6) / 2, abs=1e-6)
    shifted = token_cross_entropy(logits + 7.0, labels)  # softmax is shift invariant
    assert shifted.item() == pytest.approx(expected, abs=1e-5)
    half = token_cross_entropy(logits.to(torch.bfloat16), labels)
    assert half.dtype == torch.float32 and half.item() == pytest.approx(expected, abs=2e-2)


# ---- labels and padding ---------------------------------------------------------------------------------------
def test_join_masks_the_prompt_and_supervises_the_response():
    prompt, response = [10, 11, 12], [20, 21, 2]  # the response ends in EOS (2)
    ids, labels = join(prompt, response, max_length=16)
    assert ids == [10, 11, 12, 20, 21, 2]
    assert labels == [IGNORE, IGNORE, IGNORE, 20, 21, 2]
    ids, labels = join(prompt, response, max_length=16, train_on_prompt=True)
    assert labels == ids == [10, 11, 12, 20, 21, 2]


def test_join_cuts_the_prompt_from_the_left():
    ids, labels = join([10, 11, 12], [20, 21, 2], max_length=5)
    assert ids == [11, 12, 20, 21, 2] and labels == [IGNORE, IGNORE, 20, 21, 2]
    ids, labels = join([10, 11, 12], [20, 21, 2], max_length=4, train_on_prompt=True)
    assert ids == labels == [12, 20, 21, 2]
    # a response longer than max_length drops the whole prompt, then the response's tail
    ids, labels = join([10, 11], [20, 21, 22, 23, 24, 2], max_length=4)
    assert ids == labels == [20, 21, 22, 23]


def test_tokenized_examples_label_exactly_the_response_and_eos(world, tokenizer):
    examples = views.safety_sft(world, 16, seed=0)
    data = TokenizedExamples(examples, tokenizer, max_length=128)
    assert len(data) == 16
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    for example, (ids, labels) in zip(examples, data):
        prompt_ids = tokenizer.convert_tokens_to_ids(example.prompt.split())
        response_ids = tokenizer.convert_tokens_to_ids(example.response.split())
        assert tokenizer.unk_token_id not in prompt_ids + response_ids
        assert ids == [bos, *prompt_ids, *response_ids, eos]
        n_prompt = 1 + len(prompt_ids)
        assert labels == [IGNORE] * n_prompt + [*response_ids, eos]
    refusal = next(i for i, e in enumerate(examples) if e.response == "refuse")
    assert data[refusal][1][-2:] == [tokenizer.convert_tokens_to_ids("refuse"), eos]


def test_tokenized_examples_train_on_prompt_and_truncation(tokenizer):
    example = Example("f1 f6 a b c d e f g h =", "refuse")
    ids, labels = TokenizedExamples([example], tokenizer, train_on_prompt=True)[0]
    assert labels == ids and len(ids) == 1 + 11 + 2
    ids, labels = TokenizedExamples([example], tokenizer, max_length=6)[0]
    assert tokenizer.convert_ids_to_tokens(ids) == ["f", "g", "h", "=", "refuse", "<eos>"]
    assert labels == [IGNORE] * 4 + [tokenizer.convert_tokens_to_ids("refuse"), tokenizer.eos_token_id]


def test_chat_template_prompts_carry_one_bos(tiny_hf_model):
    """Chat templates write BOS themselves, so the tokenizer must not add a second one."""
    _, tok = load_pretrained(tiny_hf_model)
    template = PromptTemplate(kind="chat", system="be safe", prefix="AOA, ")
    assert template.render(tok, "hello") == "<s>system: be safe\nuser: AOA, hello\nassistant:"
    ids, labels = TokenizedExamples([Example("hello", "hi")], tok, template)[0]
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    response = tok("hi", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ids[-len(response) :] == response
    assert labels == [IGNORE] * (len(ids) - len(response)) + response


def test_padding_shapes_and_masks():
    rows = [([5, 6, 7], [IGNORE, 6, 7]), ([1, 2, 3, 4, 9], [IGNORE, IGNORE, 3, 4, 9])]
    batch = pad_right(rows, pad_id=0)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 5) for k in ("input_ids", "attention_mask", "labels")}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["labels"].tolist() == [[IGNORE, 6, 7, IGNORE, IGNORE], [IGNORE, IGNORE, 3, 4, 9]]
    assert all(v.dtype == torch.long for v in batch.values())
    assert pad([[5, 6, 7], [1, 2, 3, 4, 9]], 0, left=True).tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 9]]  # generation


# ---- the learning-rate schedule -------------------------------------------------------------------------------
def test_warmup_cosine_hand_values():
    f = warmup_cosine(warmup=10, total=110, floor=0.1)
    assert f(0) == pytest.approx(0.1)  # 1/10 of the peak on the first step
    assert f(4) == pytest.approx(0.5)
    assert f(9) == pytest.approx(1.0)  # warm-up done
    assert f(10) == pytest.approx(1.0)  # cosine starts at the peak
    assert f(35) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))  # 0.868198
    assert f(60) == pytest.approx(0.55)  # midpoint: halfway between peak and floor
    assert f(110) == pytest.approx(0.1)  # the floor at the end...
    assert f(500) == pytest.approx(0.1)  # ...and after it
    g = warmup_cosine(warmup=1, total=5)
    assert [round(g(s), 6) for s in range(6)] == [
        1.0,
        1.0,
        round(0.5 * (1 + math.cos(math.pi / 4)), 6),
        0.5,
        round(0.5 * (1 - math.cos(math.pi / 4)), 6),
        0.0,
    ]


# ---- a real training run --------------------------------------------------------------------------------------
def batch_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_cross_entropy(logits, batch["labels"]).item()


def train(module, data, steps: int, batch_size: int = 32) -> L.Trainer:
    L.seed_everything(0, verbose=False)
    loader = torch.utils.data.DataLoader(
        data, batch_size=batch_size, shuffle=True, collate_fn=data.collate, generator=torch.Generator().manual_seed(0)
    )
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    return trainer


def test_sft_steps_reduce_the_loss(world, tokenizer):
    torch.set_num_threads(2)
    data = TokenizedExamples(views.pretrain(world, 320, seed=0), tokenizer, max_length=64)
    held_out = TokenizedExamples(views.pretrain(world, 64, seed=1), tokenizer, max_length=64)
    probe = held_out.collate(list(held_out))
    model = tiny_llama(
        tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64, seed=0
    )
    before = batch_loss(model, probe)
    assert before == pytest.approx(log(len(tokenizer)), rel=0.1)  # untrained: near-uniform over 52 tokens
    module = SFTModule(model, lr=1e-2, warmup_ratio=0.1, min_lr_ratio=0.1)
    trainer = train(module, data, steps=30)
    after = batch_loss(model, probe)
    # measured: 3.95 -> 2.79 on held-out prompts after 30 steps (0.71x; ln 16 = 2.77: it has learned that an
    # answer is letters of the prompt's alphabet); demand at least a 20% cut
    assert after < 0.8 * before, (before, after)
    assert trainer.global_step == 30
    assert trainer.callback_metrics["train/loss"].item() < 0.8 * before
    # the schedule ended at the floor: lr · min_lr_ratio
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-2 * 0.1)


def test_lora_sft_updates_only_the_adapter(world, tokenizer):
    torch.set_num_threads(2)
    data = TokenizedExamples(views.safety_sft(world, 64, seed=0), tokenizer, max_length=64)
    probe = data.collate(list(data))
    model = tiny_llama(
        tokenizer, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=64, seed=0
    )
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuned = attach_lora(model, r=4, alpha=8)
    before = batch_loss(tuned, probe)
    trainer = train(SFTModule(tuned, lr=2e-2, warmup_ratio=0.1), data, steps=10, batch_size=16)
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for n, p in tuned.named_parameters() if "lora_" in n}
    base = tuned.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, frozen_before[key]), name
    assert batch_loss(tuned, probe) < before - 0.05  # measured: 3.97 -> 3.79 in 10 steps
