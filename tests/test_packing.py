"""Packed batches (model.packing): the layout by hand, and the same log-probs, losses and gradients as padded ones."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from test_pipeline import cli
from test_preference_methods import UNPAIRED

from safety_lab.data.collate import IGNORE as I
from safety_lab.data.collate import TokenizedExamples, TokenizedPreferences
from safety_lab.data.records import Example, Preference
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.methods import build_method, packing
from safety_lab.methods.dpo import dpo_objective
from safety_lab.methods.losses import sequence_logps
from safety_lab.methods.packing import Packed, pack, packed_if, packed_logps
from safety_lab.methods.pairs import PairModule
from safety_lab.methods.sft import SFTModule
from safety_lab.models.lora import attach_lora
from tests.conftest import SENTENCES, build_tiny_llama, build_tiny_tokenizer


def test_pairs_pack_with_their_prompt_once_and_short_units_share_a_row():
    shared = ([1, 2, 3, 4], [I, I, 3, 4]), ([1, 2, 5], [I, I, 5])  # prefix [1, 2], tails [3, 4] and [5]: 5 tokens
    disjoint = ([1, 6], [I, 6]), ([7, 6], [I, 6])  # no common prefix: two tails, 4 tokens
    # rows 5 wide (the longest unit) would need 2 × 5 positions, one row 9 wide needs 9
    batch = pack([list(shared), list(disjoint)], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 1, 6, 7, 6]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 2, 0, 1, 0, 1]]
    assert ["".join(str(int(x)) for x in row) for row in batch["attention_mask"][0, 0]] == [
        "100000000",
        "110000000",
        "111000000",
        "111100000",
        "110010000",  # the rejected tail sees the prompt, not the chosen tail
        "000001000",
        "000001100",
        "000000010",
        "000000011",
    ]
    # (row, column predicting the token, token, sequence): chosen sides are sequences 0, 1, rejected ones 2, 3
    assert batch["targets"].tolist() == [[0, 1, 3, 0], [0, 2, 4, 0], [0, 1, 5, 2], [0, 5, 6, 1], [0, 7, 6, 3]]
    assert batch["sequences"] == 4


def test_rows_are_as_wide_as_the_longest_unit_when_wider_ones_save_nothing():
    units = [[([1, 2, 3], [I, 2, 3])], [([4, 5, 6], [I, 5, 6])], [([7, 8], [I, 8])]]  # 3 + 3 + 2 tokens
    batch = pack(units, pad_id=0)  # width 3: 3 rows, 9 positions; 4: 3 rows, 12; 5: 2 rows, 10; 6: 2 rows, 12
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 0]]
    assert batch["attention_mask"][2, 0].int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]  # a pad sees itself
    assert batch["targets"].tolist() == [[0, 0, 2, 0], [0, 1, 3, 0], [1, 0, 5, 1], [1, 1, 6, 1], [2, 0, 8, 2]]


@pytest.fixture(scope="module")
def tiny():
    """A tiny chat-templated Llama with a LoRA adapter whose B factors are not zero (so the adapter matters)."""
    tokenizer = build_tiny_tokenizer()
    model = attach_lora(build_tiny_llama(len(tokenizer)), r=4, alpha=8.0)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return tokenizer, model


def pairs(n: int = 6) -> list[Preference]:
    s = SENTENCES
    return [Preference(s[i], s[(i + 1) % len(s)], " ".join(s[(i + 2) % len(s)].split()[: 2 + i])) for i in range(n)]


@pytest.mark.parametrize("attention, chunk", [("sdpa", 1024), ("eager", 1024), ("sdpa", 7)])
def test_packed_log_probs_equal_the_padded_ones(tiny, attention, chunk, monkeypatch):
    tokenizer, model = tiny
    monkeypatch.setattr(packing, "LOGIT_CHUNK", chunk)  # 7: the labels' logits in many chunks
    model.config._attn_implementation = attention
    data = TokenizedPreferences(pairs(), tokenizer, PromptTemplate("chat"), max_length=64)
    rows = [data[i] for i in range(len(data))]
    padded = data.collate(rows)
    packed = Packed(data).collate(rows)
    assert packed["input_ids"].numel() < padded["input_ids"].numel()  # prompts once, no padding but at row ends
    with torch.no_grad():
        want = sequence_logps(
            model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"]).logits, padded["labels"]
        )
        got = packed_logps(model, packed)
    model.config._attn_implementation = "sdpa"
    assert torch.equal(got[1], want[1])
    # per labelled token within 1e-5; the sums (|.| up to ~150) within float32's rounding of them
    assert torch.allclose(got[0] / got[1], want[0] / want[1], atol=1e-5, rtol=0)
    assert torch.allclose(got[0], want[0], atol=1e-5, rtol=1e-6)


def losses_and_gradients(module, batch):
    module.zero_grad()
    loss = module.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_step(module, data, rows):
    plain = losses_and_gradients(module, data.collate(rows))
    packed = losses_and_gradients(module, Packed(data).collate(rows))
    assert torch.allclose(packed[0], plain[0], atol=1e-5, rtol=0)
    assert plain[1].keys() == packed[1].keys() and plain[1]
    for name, grad in plain[1].items():
        assert torch.allclose(packed[1][name], grad, atol=1e-5, rtol=1e-4), name


def test_a_packed_dpo_step_has_the_padded_step_s_loss_and_gradients(tiny):
    tokenizer, model = tiny
    data = TokenizedPreferences(pairs(), tokenizer, PromptTemplate("chat"), max_length=64)
    rows = [data[i] for i in range(len(data))]
    with torch.no_grad():  # the reference: the same weights with the adapter off, as pairs.py computes it
        with model.disable_adapter():
            logps, counts = sequence_logps(
                model(**{k: data.collate(rows)[k] for k in ("input_ids", "attention_mask")}).logits,
                data.collate(rows)["labels"],
            )
    reference = {"logps": logps.view(2, -1).T, "counts": counts.view(2, -1).T}
    objective = dpo_objective(
        type("Cfg", (), {"beta": 0.1, "beta_rejected": None, "logp": "sum", "fixed_length": None})
    )
    module = PairModule(copy.deepcopy(model), objective, reference, lr=1e-3)
    module.log = module.log_dict = lambda *a, **k: None  # no Trainer attached
    assert_same_step(module, data, rows)


def test_a_packed_sft_step_has_the_padded_step_s_loss_and_gradients(tiny, monkeypatch):
    tokenizer, model = tiny
    monkeypatch.setattr(packing, "LOGIT_CHUNK", 5)  # gradients through chunked logits too
    examples = [Example(p.prompt, p.chosen) for p in pairs()]
    data = TokenizedExamples(examples, tokenizer, PromptTemplate("chat"), max_length=64)
    module = SFTModule(copy.deepcopy(model), lr=1e-3)
    logged = []  # the batch size train/loss is logged with, which weighs it in the epoch's mean
    module.log = lambda name, value, **k: logged.append(k["batch_size"])
    rows = [data[i] for i in range(len(data))]
    assert_same_step(module, data, rows)
    assert Packed(data).collate(rows)["input_ids"].shape[0] < len(rows) and logged == [6, 6]  # sequences, not rows


def test_packed_runs_train_dpo_sft_and_kto_end_to_end(tmp_path):
    """`model.packing=true` through the CLI: DPO and SFT on synthetic pairs, KTO on unpaired rows (mismatched
    completions, so a "pair" whose prompts differ), one store."""
    fast = ["+debug=fast", "model.packing=true", "eval.base=false", "eval.n=4"]
    cases = {
        "dpo": ["method=dpo", "dataset=preferences"],
        "sft": ["method=sft", "dataset=preferences"],
        "kto": ["method=kto", "dataset=unpaired", f"dataset.path={UNPAIRED}"],
    }
    for name, overrides in cases.items():
        run = cli(*overrides, *fast, store=tmp_path / "store", run_dir=tmp_path / name)
        assert run.returncode == 0, run.stderr[-3000:]
        assert 0 <= json.loads((tmp_path / name / "metrics.json").read_text())["harmful/refusal_rate"] <= 1


def test_packing_refuses_more_than_one_process_in_one_line():
    cfg = OmegaConf.create({"model": {"packing": True}, "strategy": {"strategy": "ddp", "devices": 2, "num_nodes": 1}})
    with pytest.raises(SafetyLabError) as error:
        packed_if(cfg, [])
    assert str(error.value) == (
        "model.packing=true trains in one process; strategy.strategy=ddp runs 2: use strategy=single or "
        "model.packing=false"
    )
    cfg.model.packing = False
    assert packed_if(cfg, []) == []


@pytest.mark.parametrize("name", ["mask_dpo", "rmu", "vaccine", "booster", "repnoise"])
def test_methods_that_do_not_pack_refuse_packing_in_one_line(name):
    stages = SimpleNamespace(cfg=OmegaConf.create({"model": {"packing": True}}))  # refused before anything loads
    with pytest.raises(SafetyLabError) as error:
        build_method(name).train(stages, None, None, None)
    assert str(error.value) == (
        f"model.packing=true: method={name} does not pack its batches (SFT's and the preference methods' do); set "
        "model.packing=false"
    )
