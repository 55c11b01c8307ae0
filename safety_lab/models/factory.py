"""Model and tokenizer factory: a tiny `LlamaForCausalLM` for the synthetic world, or any HF causal LM.

Both come back as a plain `(model, tokenizer)` pair in fp32 (or the configured dtype), so every method, fusion and
evaluation sees the same kind of object whichever world it runs in.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from safety_lab.errors import SafetyLabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_llama(tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, num_heads: int,
               intermediate_size: int, max_position_embeddings: int, seed: int = 0) -> LlamaForCausalLM:
    """A freshly initialised small Llama whose vocabulary is the tokenizer's."""
    if hidden_size % num_heads:
        raise SafetyLabError(f"model.hidden_size={hidden_size} is not divisible by model.num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def load_pretrained(path: str | Path, dtype: str = "float32", gguf_file: str | None = None):
    """Load a causal LM and its tokenizer from a local folder or a hub id (hub ids need the network)."""
    local = Path(str(path)).expanduser()
    looks_local = str(path).startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise SafetyLabError(f"model.path: {path} does not exist")
    if dtype not in DTYPES:
        raise SafetyLabError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    source = str(local) if looks_local else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], gguf_file=gguf_file)
    except (OSError, ValueError) as e:  # a folder without weights or tokenizer, an unknown hub id, no network...
        raise SafetyLabError(f"model.path: cannot load {path}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:  # many causal LMs ship without one; generation and batching need it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_pretrained(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
