"""Input-space probes of a causal LM (Jain et al. §6): local Lipschitzness and adversarial soft tokens.

Lipschitzness: ‖∂(top logit at the first output position) / ∂(input embeddings)‖ per prompt: how sharply the
decision reacts to its input. Soft tokens: `n_tokens` free embedding vectors inserted just before each prompt's
last token (the output cue) and optimised, per prompt, to make the model emit a target completion (the harmful one):
normalised-gradient descent on the completion's cross-entropy with step 2·bound/steps, each vector projected back
into the ball ‖δ‖₂ ≤ bound (by default the mean token-embedding norm), as in the seed code, except that the number
of inserted vectors is really `n_tokens`.
"""

from __future__ import annotations

import torch

from safety_lab.analysis.hooks import encode
from safety_lab.data.collate import tokenize_prompts, tokenize_responses
from safety_lab.data.template import PromptTemplate
from safety_lab.models.factory import eval_mode


def logit_gradient_norms(
    model, tokenizer, template: PromptTemplate, prompts: list[str], batch_size: int = 128
) -> torch.Tensor:
    """[n] gradient norms of the top next-token logit at each prompt's first output position."""
    norms = []
    with eval_mode(model):
        for start in range(0, len(prompts), batch_size):
            batch = encode(tokenizer, template, prompts[start : start + batch_size])
            mask = batch["attention_mask"].to(model.device)
            embeds = model.get_input_embeddings()(batch["input_ids"].to(model.device)).detach().requires_grad_()
            logits = model(inputs_embeds=embeds, attention_mask=mask).logits
            top = logits[torch.arange(len(mask)), batch["last"]].max(-1).values
            (grad,) = torch.autograd.grad(top.sum(), embeds)  # rows are independent: one backward for all
            norms.append((grad * mask[..., None]).flatten(1).norm(dim=1).detach().cpu())
    return torch.cat(norms)


def mean_embedding_norm(model) -> float:
    return float(model.get_input_embeddings().weight.detach().norm(dim=1).mean())


def _layout(tokenizer, template: PromptTemplate, prompts: list[str], targets: list[str], n_tokens: int):
    """Token ids, attention mask and target labels of `[pad…] prompt[:-1] [soft×n] prompt[-1] target [pad…]`: prompts
    left-aligned on their end, so the soft tokens sit in the same columns for every row."""
    bodies = tokenize_prompts(tokenizer, template, prompts)
    answers = tokenize_responses(tokenizer, targets)
    body_width, answer_width = max(map(len, bodies)) - 1, max(map(len, answers))
    start = body_width  # first soft column
    width = body_width + n_tokens + 1 + answer_width
    pad = tokenizer.pad_token_id
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (body, answer) in enumerate(zip(bodies, answers)):
        left = body_width - (len(body) - 1)
        ids[i, left:start] = torch.tensor(body[:-1], dtype=torch.long)
        cue = start + n_tokens
        ids[i, cue] = body[-1]
        ids[i, cue + 1 : cue + 1 + len(answer)] = torch.tensor(answer)
        mask[i, left : cue + 1 + len(answer)] = 1
        labels[i, cue : cue + len(answer)] = torch.tensor(answer)  # the logits at column t predict token t + 1
    return ids, mask, labels, start


def soft_token_attack(
    model,
    tokenizer,
    template: PromptTemplate,
    prompts: list[str],
    targets: list[str],
    n_tokens: int,
    steps: int,
    bound: float | None = None,
    report_at: tuple[int, ...] = (),
    seed: int = 0,
) -> dict:
    """Optimise `n_tokens` soft vectors per prompt for `steps` steps; returns the success rate (the greedy completion
    equals the target exactly, EOS included) at step 0, at each step in `report_at` and at the end, the final
    cross-entropy, and the soft vectors themselves ([n, n_tokens, d], every one of norm ≤ bound)."""
    bound = mean_embedding_norm(model) if bound is None else bound
    ids, mask, labels, start = _layout(tokenizer, template, prompts, targets, n_tokens)
    device = next(model.parameters()).device
    ids, mask, labels = ids.to(device), mask.to(device), labels.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    base = model.get_input_embeddings()(ids).detach()
    generator = torch.Generator().manual_seed(seed)
    delta = (0.01 * torch.randn(len(prompts), n_tokens, base.shape[-1], generator=generator)).to(device)
    delta.requires_grad_()
    step_size = 2 * bound / max(steps, 1)
    valid = labels != -100
    trainable = [p.requires_grad for p in model.parameters()]
    model.requires_grad_(False)

    def forward():
        embeds = torch.cat([base[:, :start], delta, base[:, start + n_tokens :]], dim=1)
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels.clamp(min=0), reduction="none")
        per_row = (token_loss * valid).sum(1) / valid.sum(1)
        success = ((logits.argmax(-1) == labels) | ~valid).all(1)
        return per_row, success

    success_at = {}
    with eval_mode(model):
        try:
            for step in range(steps + 1):
                per_row, success = forward()
                if step == 0 or step in report_at or step == steps:
                    success_at[step] = float(success.float().mean())
                if step == steps:
                    break
                (grad,) = torch.autograd.grad(per_row.sum(), delta)  # one δ per prompt: the sum separates them
                with torch.no_grad():
                    delta -= step_size * grad / grad.norm(dim=-1, keepdim=True).clamp(min=1e-12)
                    delta *= (bound / delta.norm(dim=-1, keepdim=True).clamp(min=1e-12)).clamp(max=1.0)
        finally:
            for p, flag in zip(model.parameters(), trainable):
                p.requires_grad_(flag)
    return {
        "n_tokens": n_tokens,
        "steps": steps,
        "bound": bound,
        "success": success_at,
        "loss": float(per_row.detach().mean()),
        "soft_tokens": delta.detach().cpu(),
    }
