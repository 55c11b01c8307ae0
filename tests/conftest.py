"""Shared fixtures: the default synthetic world and its tokenizer, and a tiny real Hugging Face causal LM built
offline, for tests of the real-model code path.

Nothing here touches the network: the tokenizer is trained with `tokenizers` on a few dozen sentences, the model
is a randomly initialised two-layer `LlamaForCausalLM`, and both are saved with `save_pretrained` exactly like a
hub checkpoint, so `AutoTokenizer`/`AutoModelForCausalLM.from_pretrained(<folder>)` load them.
"""

from __future__ import annotations

import os

import pytest
import torch

from safety_lab.worlds.synthetic.tokenizer import build_tokenizer
from safety_lab.worlds.synthetic.world import World

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each, no oversubscription
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def world() -> World:
    return World()  # 16 letters, 2 languages, 8 operators: f1 f2 unsafe, f3 f4 f5 conditional, f0 f6 f7 safe


@pytest.fixture(scope="session")
def tokenizer(world):
    return build_tokenizer(world)


SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a model should refuse harmful requests politely",
    "how do i bake a loaf of bread at home",
    "mix flour water salt and yeast then let it rise",
    "what is the capital of france",
    "the capital of france is paris",
    "please explain how photosynthesis works",
    "plants turn light water and air into sugar",
    "i can not help with that request",
    "sure here is a short poem about the sea",
    "the sea is wide and the waves are blue",
    "write a story about a brave little robot",
    "once upon a time a robot learned to paint",
    "how many legs does a spider have",
    "a spider has eight legs",
    "tell me a joke about computers",
    "why did the computer go to the doctor it had a virus",
    "translate good morning into spanish",
    "good morning in spanish is buenos dias",
    "what is two plus two",
    "two plus two is four",
    "list three primary colours",
    "red yellow and blue are primary colours",
    "how do i pick a strong password",
    "use a long random phrase that you do not reuse",
    "summarise the plot of a famous novel",
    "a young wizard goes to school and fights evil",
    "give me a recipe for a green salad",
    "lettuce cucumber olive oil and lemon juice",
    "what time is it in tokyo right now",
    "i do not have access to the current time",
    "describe the water cycle in one sentence",
    "water evaporates condenses into clouds and falls as rain",
    "user assistant system",
]

# Minimal chat template: each turn on its own line as "role: content", then "assistant:" for generation.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def build_tiny_tokenizer():
    """A byte-less BPE tokenizer (~200 tokens) with <pad>, <s>, </s>, <unk> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(
        SENTENCES, trainers.BpeTrainer(vocab_size=200, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        chat_template=CHAT_TEMPLATE,
    )


def build_tiny_llama(vocab_size: int, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory):
    """Path of a folder holding a tiny LlamaForCausalLM + tokenizer saved with `save_pretrained` (no network)."""
    folder = tmp_path_factory.mktemp("tiny_hf_model")
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.convert_tokens_to_ids(["<pad>", "<s>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    model = build_tiny_llama(len(tokenizer))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder
