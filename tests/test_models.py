"""Model factory and LoRA adapters: the tiny synthetic Llama, loading any local HF model, adapter save/load.

The real-model path is exercised on the offline tiny checkpoint from `conftest.tiny_hf_model`; LoRA round trips
must reproduce logits exactly, since a λ sweep loads every adapter from the store rather than from memory.
"""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

from safety_lab.errors import SafetyLabError
from safety_lab.models.factory import load_pretrained, save_pretrained, tiny_llama
from safety_lab.models.lora import attach_lora, load_adapter, save_adapter, trainable
from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World

SMALL = dict(hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_position_embeddings=32)


@pytest.fixture(scope="module")
def synthetic_tokenizer():
    return build_tokenizer(World())


def logits_of(model, input_ids: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


# ---- the tiny synthetic Llama ---------------------------------------------------------------------------------
def test_tiny_llama_uses_the_synthetic_vocabulary(synthetic_tokenizer):
    model = tiny_llama(synthetic_tokenizer, **SMALL)
    assert isinstance(model, LlamaForCausalLM)
    assert model.config.vocab_size == len(synthetic_tokenizer) == len(World().vocabulary) == 52
    assert model.get_input_embeddings().weight.shape == (52, 16)
    assert model.config.pad_token_id == synthetic_tokenizer.pad_token_id == 0
    assert model.config.eos_token_id == synthetic_tokenizer.eos_token_id
    ids = torch.tensor([synthetic_tokenizer("f1 f6 a b c =")["input_ids"]])
    assert logits_of(model, ids).shape == (1, ids.shape[1], 52)


def test_default_tiny_llama_size_matches_its_config_comment(synthetic_tokenizer):
    """conf/model/tiny_llama.yaml promises ~0.45M parameters (96 wide, 3 layers, 384 MLP, tied embeddings)."""
    model = tiny_llama(synthetic_tokenizer, 96, 3, 3, 384, 128)
    assert sum(p.numel() for p in model.parameters()) == 448_032


def test_tiny_llama_is_deterministic_for_a_seed(synthetic_tokenizer):
    a, b = tiny_llama(synthetic_tokenizer, **SMALL, seed=3), tiny_llama(synthetic_tokenizer, **SMALL, seed=3)
    c = tiny_llama(synthetic_tokenizer, **SMALL, seed=4)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.layers[0].self_attn.q_proj.weight, c.model.layers[0].self_attn.q_proj.weight)
    # seeding is local: the global RNG stream is left as it was
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    tiny_llama(synthetic_tokenizer, **SMALL, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_llama_rejects_heads_that_do_not_divide_the_width(synthetic_tokenizer):
    with pytest.raises(SafetyLabError, match="hidden_size=16 is not divisible by model.num_heads=3"):
        tiny_llama(synthetic_tokenizer, **{**SMALL, "num_heads": 3})


def test_synthetic_model_save_load_round_trip(synthetic_tokenizer, tmp_path):
    model = tiny_llama(synthetic_tokenizer, **SMALL, seed=1)
    save_pretrained(model, synthetic_tokenizer, tmp_path)
    assert (tmp_path / "model.safetensors").exists() and not list(tmp_path.glob("*.bin"))
    loaded, tokenizer = load_pretrained(tmp_path)
    ids = torch.tensor([synthetic_tokenizer("f2 f7 A B =")["input_ids"]])
    assert tokenizer("f2 f7 A B =")["input_ids"] == ids[0].tolist()
    torch.testing.assert_close(logits_of(loaded, ids), logits_of(model, ids), atol=0, rtol=0)


# ---- any HF causal LM from a local folder ---------------------------------------------------------------------
def test_load_pretrained_reads_a_local_hf_folder(tiny_hf_model):
    model, tokenizer = load_pretrained(str(tiny_hf_model))
    assert isinstance(model, LlamaForCausalLM) and model.dtype == torch.float32
    assert model.config.hidden_size == 32 and model.config.num_hidden_layers == 2
    saved = load_file(tiny_hf_model / "model.safetensors")
    state = model.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(state[name], tensor), name
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "</s>"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<s>user: hello\nassistant:"


def test_load_pretrained_casts_to_the_requested_dtype(tiny_hf_model):
    model, _ = load_pretrained(tiny_hf_model, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    with pytest.raises(SafetyLabError, match="model.dtype='fp8'"):
        load_pretrained(tiny_hf_model, dtype="fp8")


def test_load_pretrained_sets_a_missing_pad_token(tiny_hf_model, tmp_path):
    folder = tmp_path / "no_pad"
    shutil.copytree(tiny_hf_model, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).pad_token is None
    _, loaded = load_pretrained(folder)
    assert loaded.pad_token == "</s>" and loaded.pad_token_id == loaded.eos_token_id == 2


def test_load_pretrained_names_a_missing_path():
    with pytest.raises(SafetyLabError, match="/nonexistent"):
        load_pretrained("/nonexistent")


def test_load_pretrained_names_a_folder_that_is_not_a_model(tmp_path, tiny_hf_model):
    with pytest.raises(SafetyLabError, match=f"cannot load {tmp_path}"):
        load_pretrained(tmp_path)  # empty
    (tmp_path / "tokenizer.json").write_bytes((tiny_hf_model / "tokenizer.json").read_bytes())
    shutil.copy(tiny_hf_model / "tokenizer_config.json", tmp_path)
    shutil.copy(tiny_hf_model / "config.json", tmp_path)
    with pytest.raises(SafetyLabError, match=f"cannot load {tmp_path}"):
        load_pretrained(tmp_path)  # a tokenizer and config but no weights


# ---- LoRA adapters --------------------------------------------------------------------------------------------
def test_attach_lora_trains_only_the_adapter(tiny_hf_model):
    model, _ = load_pretrained(tiny_hf_model)
    peft_model = attach_lora(model, r=4, alpha=8)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)
    # all-linear = q k v o (32→32), gate up (32→64), down (64→32) in 2 layers; each gets r·(in + out) params
    per_layer = 4 * 4 * (32 + 32) + 2 * 4 * (32 + 64) + 4 * (64 + 32)
    assert sum(p.numel() for p in trainable.values()) == 2 * per_layer == 4352
    frozen = [n for n, p in peft_model.named_parameters() if not p.requires_grad]
    assert any("embed_tokens" in n for n in frozen)
    # lora_B starts at zero: attaching changes nothing until training
    base, tokenizer = load_pretrained(tiny_hf_model)
    ids = torch.tensor([tokenizer("what is two plus two")["input_ids"]])
    torch.testing.assert_close(logits_of(peft_model, ids), logits_of(base, ids), atol=0, rtol=0)


def test_full_fine_tuning_unfreezes_a_merged_model(tiny_hf_model):
    """A model whose earlier stage was merged (peft leaves its weights frozen) trains in full with lora=None."""
    model, _ = load_pretrained(tiny_hf_model)
    model.requires_grad_(False)
    tuned = trainable(model, None)
    assert tuned is model and all(p.requires_grad for p in tuned.parameters())
    adapted = trainable(load_pretrained(tiny_hf_model)[0], {"r": 4, "alpha": 8})
    assert sum(p.numel() for p in adapted.parameters() if p.requires_grad) == 4352  # the adapter only, as above


def test_adapter_save_load_reproduces_logits(tiny_hf_model, tmp_path):
    base, tokenizer = load_pretrained(tiny_hf_model)
    ids = torch.tensor([tokenizer("how do i bake a loaf of bread")["input_ids"]])
    base_logits = logits_of(base, ids)
    tuned = attach_lora(base, r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    tuned_logits = logits_of(tuned, ids)
    assert (tuned_logits - base_logits).abs().max() > 1e-2  # the perturbation matters

    save_adapter(tuned, tmp_path / "adapter")
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not [f for f in files if f.endswith(".bin")]
    assert set(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == {
        n.replace(".default", "") for n, _ in tuned.named_parameters() if "lora_" in n
    }

    fresh, _ = load_pretrained(tiny_hf_model)
    restored = load_adapter(fresh, tmp_path / "adapter")
    torch.testing.assert_close(logits_of(restored, ids), tuned_logits, atol=1e-6, rtol=0)

    # onto a model that already carries an adapter: added under a new name, selectable
    again = load_adapter(restored, tmp_path / "adapter", adapter_name="second")
    assert set(again.peft_config) == {"default", "second"}
    again.set_adapter("second")
    torch.testing.assert_close(logits_of(again, ids), tuned_logits, atol=1e-6, rtol=0)
