"""Reading and steering a Llama-style causal LM's internals with forward hooks.

`activations` records, per decoder layer, the residual stream entering the layer (the refusal direction's), the
MLP hidden activation act(gate)·up (what `down_proj` sees: the activation space's) and, on request, the input of any
named projection (`q_proj` … `down_proj`: the row space's), at the first output position of each prompt: the
position whose next-token prediction is the answer, or the refusal. `steer` ablates a
direction from the whole residual stream (Arditi et al.) or adds it at one layer's input, for as long as the
context is open, so generation and scoring under an intervention reuse the ordinary code.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

from safety_lab.analysis.geometry import ablate
from safety_lab.data.collate import pad_right, tokenize_prompts
from safety_lab.data.template import PromptTemplate
from safety_lab.errors import SafetyLabError
from safety_lab.models.factory import eval_mode

SITES = ("resid", "mlp_hidden")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # Llama's linear layers


def decoder_layers(model) -> list:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None or not all(hasattr(layer, "mlp") and hasattr(layer.mlp, "down_proj") for layer in layers):
        raise SafetyLabError(
            f"analysis needs a Llama-style decoder (model.layers[i].mlp.down_proj); got {type(model).__name__}"
        )
    return list(layers)


def projection(layer, name: str) -> torch.nn.Module:
    """The decoder layer's linear layer `name` (one of PROJECTIONS), in its attention block or its MLP."""
    block = layer.self_attn if name in PROJECTIONS[:4] else layer.mlp
    return getattr(block, name)


def encode(tokenizer, template: PromptTemplate, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Right-padded prompt batch plus `last`: the index of each prompt's last token (its first output position)."""
    ids = tokenize_prompts(tokenizer, template, prompts)
    batch = pad_right([(row, row) for row in ids], tokenizer.pad_token_id)
    return {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "last": torch.tensor([len(row) - 1 for row in ids]),
    }


@torch.no_grad()
def activations(
    model, tokenizer, template: PromptTemplate, prompts: list[str], batch_size: int = 256, inputs: tuple = ()
):
    """({site: [layers, n, d]} at each prompt's first output position, next-token logits there [n, vocab]); the
    sites are SITES and the input of each projection named in `inputs`. Logits are computed at that position only
    and the hooks keep only that position of each site (a batch of long prompts would not fit every position of
    every site, nor full logits over a real vocabulary)."""
    layers = decoder_layers(model)
    sites = (*SITES, *inputs)
    rows: dict[str, list[list[torch.Tensor]]] = {site: [[] for _ in layers] for site in sites}
    at: dict[str, torch.Tensor] = {}  # the batch's rows and their first output positions

    def recorder(site: str, i: int):
        def hook(module, args):
            rows[site][i].append(args[0][at["rows"], at["last"]].detach().float().cpu())

        return hook

    handles = [
        h
        for i, layer in enumerate(layers)
        for h in (
            layer.register_forward_pre_hook(recorder("resid", i)),
            layer.mlp.down_proj.register_forward_pre_hook(recorder("mlp_hidden", i)),
            *(projection(layer, name).register_forward_pre_hook(recorder(name, i)) for name in inputs),
        )
    ]
    logits = []
    try:
        with eval_mode(model):
            for start in range(0, len(prompts), batch_size):
                batch = encode(tokenizer, template, prompts[start : start + batch_size])
                at.update(rows=torch.arange(len(batch["last"])), last=batch["last"])
                hidden = model.model(
                    input_ids=batch["input_ids"].to(model.device),
                    attention_mask=batch["attention_mask"].to(model.device),
                ).last_hidden_state
                logits.append(model.get_output_embeddings()(hidden[at["rows"], at["last"]]).float().cpu())
    finally:
        for h in handles:
            h.remove()
    return {site: torch.stack([torch.cat(per_layer) for per_layer in rows[site]]) for site in sites}, torch.cat(logits)


@contextmanager
def steer(model, direction: torch.Tensor, mode: str, layer: int = 0, coefficient: float = 1.0):
    """`mode="ablate"`: x ← x − (x·r̂)r̂ on every layer's input and every attention and MLP output, so no layer ever
    writes or reads the direction. `mode="add"`: x ← x + coefficient·r at the input of `layer` only."""
    layers = decoder_layers(model)
    r = direction.to(next(model.parameters()).device, next(model.parameters()).dtype)

    def on_input(module, args):
        x = args[0]
        return (ablate(x, r) if mode == "ablate" else x + coefficient * r, *args[1:])

    def on_output(module, args, output):
        if isinstance(output, tuple):
            return (ablate(output[0], r), *output[1:])
        return ablate(output, r)

    if mode == "ablate":
        handles = [
            h
            for layer_ in layers
            for h in (
                layer_.register_forward_pre_hook(on_input),
                layer_.self_attn.register_forward_hook(on_output),
                layer_.mlp.register_forward_hook(on_output),
            )
        ]
    elif mode == "add":
        handles = [layers[layer].register_forward_pre_hook(on_input)]
    else:
        raise ValueError(f"steer mode must be 'ablate' or 'add', got {mode!r}")
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
