"""Preference and unlearning losses against hand computations, the preference batch layout, and DPO against TRL's
DPOTrainer on identical inputs (the same tiny model, batch and reference)."""

from __future__ import annotations

import math

import pytest
import torch

from safety_lab.data.collate import IGNORE, TokenizedPreferences
from safety_lab.data.records import Preference
from safety_lab.methods.losses import ascent_term, dpo_loss, normalise_logps, npo_term, sequence_logps, unlearning_loss
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World

log, sig = math.log, lambda x: 1 / (1 + math.exp(-x))


def test_sequence_logps_sums_only_labelled_next_tokens():
    # vocabulary of 3; row 0 labels positions 1 and 2, row 1 only position 2
    logits = torch.tensor(
        [
            [[0.0, 0.0, 0.0], [log(2), 0.0, 0.0], [0.0, 0.0, 0.0]],
            [[0.0, log(3), 0.0], [0.0, 0.0, log(5)], [9.0, 9.0, 9.0]],
        ]
    )
    labels = torch.tensor([[IGNORE, 1, 0], [IGNORE, IGNORE, 2]])
    summed, counts = sequence_logps(logits, labels)
    # row 0: p(1 | pos 0) = 1/3, p(0 | pos 1) = 2/4; row 1: p(2 | pos 1) = 5/7
    assert summed.tolist() == pytest.approx([log(1 / 3) + log(2 / 4), log(5 / 7)])
    assert counts.tolist() == [2, 1]


def test_normalise_logps():
    summed, counts = torch.tensor([-6.0, -3.0]), torch.tensor([3, 1])
    assert normalise_logps(summed, counts, "sum").tolist() == [-6.0, -3.0]
    assert normalise_logps(summed, counts, "mean").tolist() == [-2.0, -3.0]
    assert normalise_logps(summed, counts, "fixed", 159).tolist() == pytest.approx([-6 / 159, -3 / 159])
    with pytest.raises(ValueError, match="sum, mean or fixed"):
        normalise_logps(summed, counts, "max")


def test_dpo_loss_matches_hand_computation():
    pc, pr, rc, rr = (torch.tensor(v) for v in ([-1.0, -2.0], [-3.0, -1.0], [-2.0, -2.0], [-2.0, -2.0]))
    # margins: 0.1·(1 − (−1)) = 0.2 and 0.1·(0 − 1) = −0.1
    expected = -(log(sig(0.2)) + log(sig(-0.1))) / 2
    assert dpo_loss(pc, pr, rc, rr, beta=0.1).item() == pytest.approx(expected, rel=1e-6)
    # Jain et al.'s asymmetric betas: 0.1·1 − 0.01·(−1) = 0.11 and 0.1·0 − 0.01·1 = −0.01
    expected = -(log(sig(0.11)) + log(sig(-0.01))) / 2
    assert dpo_loss(pc, pr, rc, rr, beta=0.1, beta_rejected=0.01).item() == pytest.approx(expected, rel=1e-6)


def test_npo_and_gradient_difference_match_hand_computation():
    forget, ref = torch.tensor([-1.0, -4.0]), torch.tensor([-2.0, -2.0])
    # (2/β)·mean log(1 + exp(β·(π − ref))) with β = 0.5: terms log(1+e^0.5), log(1+e^−1)
    expected = 2 / 0.5 * (log(1 + math.exp(0.5)) + log(1 + math.exp(-1))) / 2
    assert npo_term(forget, ref, beta=0.5).item() == pytest.approx(expected, rel=1e-6)
    keep_nll, forget_nll = torch.tensor([1.0, 3.0]), torch.tensor([2.0, 6.0])
    # Jain et al.: 1 · mean NLL(keep) − 0.1 · mean NLL(forget) = 2 − 0.4
    assert unlearning_loss(keep_nll, ascent_term(forget_nll)).item() == pytest.approx(1.6)
    # a clamp at 5 stops the second sequence from being pushed further: −mean(2, 5)
    assert ascent_term(forget_nll, clamp=5.0).item() == pytest.approx(-3.5)
    clamped = forget_nll.clone().requires_grad_()
    ascent_term(clamped, clamp=5.0).backward()
    assert clamped.grad.tolist() == [-0.5, 0.0]


def test_preference_batches_put_chosen_then_rejected_in_one_batch():
    world = World()
    tokenizer = build_tokenizer(world)
    pairs = [Preference("a b =", "refuse", "c d"), Preference("e =", "f", "refuse")]
    data = TokenizedPreferences(pairs, tokenizer, max_length=32)
    batch = data.collate([data[1], data[0]])
    assert batch["input_ids"].shape[0] == 4 and batch["index"].tolist() == [1, 0]
    decoded = [
        tokenizer.convert_ids_to_tokens([t for t, l in zip(ids, lab) if l != IGNORE])
        for ids, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist())
    ]
    eos = tokenizer.eos_token
    assert decoded == [["f", eos], ["refuse", eos], ["refuse", eos], ["c", "d", eos]]
    assert data.fingerprint == TokenizedPreferences(pairs, tokenizer, max_length=32).fingerprint
    assert data.fingerprint != TokenizedPreferences(pairs[:1], tokenizer, max_length=32).fingerprint


def test_dpo_loss_equals_trl_on_identical_inputs(tiny_hf_model, tmp_path):
    """TRL's DPOTrainer and our losses score the same batch of the same LoRA model to the same loss."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_hf_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_hf_model)
    rows = {
        "prompt": ["what is two plus two", "how do i bake bread"],
        "chosen": [" two plus two is four", " mix flour water salt"],
        "rejected": [" i can not help", " the sea is wide and blue"],
    }
    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        beta=0.1,
        report_to="none",
        use_cpu=True,
        logging_steps=1,
        save_strategy="no",
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
    )  # random B: policy ≠ reference
    inputs = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, inputs).item()

    policy = trainer.model
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE)
    with torch.no_grad():
        logps, _ = sequence_logps(
            policy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits, labels
        )
        with policy.disable_adapter():
            ref, _ = sequence_logps(
                policy(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits, labels
            )
    ours = dpo_loss(*logps.chunk(2), *ref.chunk(2), beta=0.1).item()
    assert abs(ours - log(2)) > 1e-3  # the adapter moved the policy away from the reference
    assert ours == pytest.approx(trl_loss, rel=1e-5)
