"""Alignment-stage defenses against harmful fine-tuning: Vaccine, RepNoise and Booster, each a method of its own
(`method=vaccine|repnoise|booster`), meant as a run's `align` stage (`+method@align.method=booster
+dataset@align.dataset=safety_sft`), so every later fine-tune starts from the model they make.

- Vaccine (Huang et al. 2024, "Perturbation-aware alignment"): per step, the gradient g of the alignment loss with
  respect to every decoder layer's attention output, then the loss with ρ·g/‖g‖ (one norm over all layers) added to
  those outputs through forward hooks, whose gradient takes the step (`perturbed_loss`; the authors' trainer).
- RepNoise (Rosati et al. 2024, "Representation noising"): NLL on the retain (safe) data, minus α·log(1 + the harmful
  answers' NLL, averaged over the final layer and every hidden state read through the LM head, as the authors'
  code), plus β·the MMD between each layer's MLP output on harmful answers and Gaussian noise (`repnoise_loss`).
- Booster (Huang et al. 2024, "Attenuating harmful perturbation"): the alignment loss plus λ·(h(w) −
  h(w − α·∇h(w)/‖∇h(w)‖)), h the loss on harmful data: the drop in harmful loss one normalised harmful step would
  bring is penalised (`booster_regulariser`; first order, the step direction held fixed, as the authors' trainer).

The alignment data is the stage's dataset, as SFT reads it (examples, or the chosen sides of preference pairs).
RepNoise and Booster also read harmful (prompt, harmful answer) data from `method.harmful`, a dataset config
(conf/dataset/: by default harmful_ft.yaml, the synthetic `harmful_ft` view on a seed apart from the attacks'; a file
such as beavertails_harmful; or preference pairs whose rejected sides are the harmful answers, e.g. pku_saferlhf):
alignment row i is batched with harmful row i mod H.
A micro-batch's losses are means over its labelled tokens, as in the papers' code; the global batch averages its
micro-batches by rows. Dropout is off, so the two forwards of a step see the same function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from torch.utils.data import Dataset

from safety_lab.config import plain
from safety_lab.data.collate import IGNORE, TokenizedExamples
from safety_lab.data.records import Example, Preference
from safety_lab.errors import SafetyLabError
from safety_lab.methods import Method, method, training_records
from safety_lab.methods.losses import token_cross_entropy
from safety_lab.methods.packing import refuse_packing
from safety_lab.methods.pairs import disable_dropout
from safety_lab.methods.sft import SFTModule, optimiser_settings, sft_data
from safety_lab.models.lora import trainable
from safety_lab.models.sharding import no_split_layers

NORM_EPS = 1e-7  # added to ‖g‖, as both of Huang et al.'s trainers do


# ---- objectives ----------------------------------------------------------------------------------------------
def scaled_to_norm(tensors: Sequence[torch.Tensor], norm: float) -> list[torch.Tensor]:
    """The tensors scaled together to L2 norm `norm` (one norm over all of them): norm·t_i / (‖t‖ + 1e-7)."""
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.float()) for t in tensors]))
    return [t * (norm / (total + NORM_EPS)) for t in tensors]


@contextmanager
def forward_hooks(modules: Sequence[torch.nn.Module], hook: Callable):
    """`hook(i, output)` on the output of `modules[i]` (the first element of a tuple output) for the duration; a
    tensor it returns replaces that output."""

    def wrap(i):
        def fn(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            new = hook(i, first)
            if new is None:
                return None
            return (new, *output[1:]) if isinstance(output, tuple) else new

        return fn

    handles = [module.register_forward_hook(wrap(i)) for i, module in enumerate(modules)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def perturbed_loss(loss: Callable[[], torch.Tensor], modules: Sequence[torch.nn.Module], rho: float) -> torch.Tensor:
    """Vaccine's objective: `loss()` recomputed with ρ·g/‖g‖ added to the outputs of `modules`, g the gradient of a
    first `loss()` with respect to those outputs (one norm over all of them). The perturbation is a constant: the
    gradient of the result is the loss's gradient at the perturbed representations (outputs that do not depend on
    the trained weights are left unperturbed)."""
    outputs = {}
    with forward_hooks(modules, outputs.__setitem__):
        first = loss()
    tracked = [i for i in sorted(outputs) if outputs[i].requires_grad]
    grads = torch.autograd.grad(first, [outputs[i] for i in tracked])
    perturbation = dict(zip(tracked, scaled_to_norm(grads, rho)))
    with forward_hooks(modules, lambda i, output: output + perturbation[i] if i in perturbation else None):
        return loss()


def booster_regulariser(params: Sequence[torch.Tensor], harmful_loss: Callable[[], torch.Tensor], alpha: float):
    """Booster's regulariser h(w) − h(w − α·∇h(w)/‖∇h(w)‖), h = `harmful_loss()` at the current `params`: its value,
    and as its gradient ∇h(w) − ∇h(w − α·∇h/‖∇h‖) with the step held fixed (the authors' first-order update).
    The weights are restored exactly afterwards."""
    harmful = harmful_loss()
    grads = torch.autograd.grad(harmful, params, allow_unused=True, materialize_grads=True)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, step in zip(params, scaled_to_norm(grads, alpha)):
            p.sub_(step)
    try:
        perturbed = harmful_loss()
        perturbed_grads = torch.autograd.grad(perturbed, params, allow_unused=True, materialize_grads=True)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
    # value h − h_perturbed, gradient Σ p·(g − g_perturbed)
    linear = sum((p * (g - gp)).sum() for p, g, gp in zip(params, grads, perturbed_grads))
    return (harmful - perturbed).detach() + linear - linear.detach()


def gaussian_mmd(x: torch.Tensor, y: torch.Tensor, kernel_mul: float = 2.0, kernel_num: int = 5) -> torch.Tensor:
    """Squared MMD between the rows of x and y ([n, D] each) under a sum of `kernel_num` Gaussian kernels
    exp(−‖a − b‖²/σ_k), σ_k = σ·kernel_mul^(k − kernel_num//2), σ the mean squared distance between distinct rows
    of both (not differentiated): the MMD_loss of RepNoise's code, mean(K_xx + K_yy − K_xy − K_yx)."""
    total = torch.cat([x, y]).float()
    distances = torch.cdist(total, total).pow(2)
    n = total.shape[0]
    bandwidth = distances.detach().sum() / (n * n - n) / kernel_mul ** (kernel_num // 2)
    kernel = sum(torch.exp(-distances / (bandwidth * kernel_mul**k)) for k in range(kernel_num))
    m = x.shape[0]
    return (kernel[:m, :m] + kernel[m:, m:] - kernel[:m, m:] - kernel[m:, :m]).mean()


def representation_noise(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RepNoise's noise term for one layer: `gaussian_mmd` between its output at the `mask`ed positions ([B, T] of
    [B, T, d], each row flattened) and standard Gaussian noise at the same positions."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)
    masked = hidden * mask
    return gaussian_mmd(masked.flatten(1), (torch.randn_like(masked) * mask).flatten(1))


def repnoise_loss(
    retain_nll: torch.Tensor, harmful_nlls: torch.Tensor, noise: torch.Tensor, alpha: float = 1.0, beta: float = 0.001
) -> torch.Tensor:
    """RepNoise (Rosati et al. 2024), as the authors' code: retain NLL + β·mean(noise) − α·log(1 + Σ harmful_nlls /
    (len(harmful_nlls) − 1)), where harmful_nlls holds the harmful answers' NLL at the final layer and then through
    the LM head at each of the model's hidden states (the sum divided by the number of hidden states), and noise
    the per-layer MMDs to Gaussian noise. The log bounds the ascent."""
    harmful = harmful_nlls.sum() / (len(harmful_nlls) - 1)
    return retain_nll + beta * noise.mean() - alpha * torch.log(1 + harmful)


# ---- data ----------------------------------------------------------------------------------------------------
def harmful_data(stages, base, cfg) -> TokenizedExamples:
    """`method.harmful`'s (prompt, harmful answer) rows: its examples, or the rejected sides of its pairs."""
    records = training_records(stages, base, cfg, cfg.harmful, Example, Preference)
    harmful = [Example(r.prompt, r.rejected) if isinstance(r, Preference) else r for r in records]
    return TokenizedExamples(harmful, base.tokenizer, stages.template, stages.cfg.model.max_length)


class WithHarmful(Dataset):
    """Alignment rows, row i paired with harmful row i mod H: a batch is the alignment batch with the harmful one
    under "harmful". A row counts as one unit of the global batch (data/batching.py)."""

    def __init__(self, aligned: TokenizedExamples, harmful: TokenizedExamples):
        self.aligned, self.harmful = aligned, harmful

    def __len__(self) -> int:
        return len(self.aligned)

    def __getitem__(self, i: int) -> dict:
        return {"aligned": self.aligned[i], "harmful": self.harmful[i % len(self.harmful)]}

    def collate(self, rows) -> dict:
        batch = self.aligned.collate([row["aligned"] for row in rows])
        batch["harmful"] = self.harmful.collate([row["harmful"] for row in rows])
        return batch


# ---- training ------------------------------------------------------------------------------------------------
def sublayers(model: torch.nn.Module, name: str, method_name: str) -> list[torch.nn.Module]:
    """The `name` submodule (`self_attn`, `mlp`) of every decoder layer of a Hugging Face causal LM."""
    found = [getattr(layer, name, None) for layer in no_split_layers(model)]
    if not found or None in found:
        raise SafetyLabError(
            f"method={method_name} needs a Hugging Face decoder whose layers have `{name}`; got {type(model).__name__}"
        )
    return found


def lm_loss(model, batch: dict) -> torch.Tensor:
    """Per-token mean NLL of the batch's labelled tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return token_cross_entropy(logits, batch["labels"])


class VaccineModule(SFTModule):
    def __init__(self, model, rho: float, **optimiser):
        super().__init__(model, **optimiser)
        self.rho = rho

    def training_step(self, batch, batch_idx):
        labels = batch["labels"]

        def summed():
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            return token_cross_entropy(logits, labels, reduction="sum")

        loss = perturbed_loss(summed, sublayers(self.model, "self_attn", "vaccine"), self.rho)
        tokens = (labels[:, 1:] != IGNORE).sum().clamp(min=1)
        self.log("train/loss", loss / tokens, prog_bar=True, batch_size=labels.shape[0])
        return loss / batch.get("loss_normalizer", tokens)  # SFT's normalisation (sft.py)


class BoosterModule(SFTModule):
    def __init__(self, model, lamb: float, alpha: float, **optimiser):
        super().__init__(model, **optimiser)
        self.lamb, self.alpha = lamb, alpha

    def training_step(self, batch, batch_idx):
        params = [p for p in self.model.parameters() if p.requires_grad]
        regulariser = booster_regulariser(params, lambda: lm_loss(self.model, batch["harmful"]), self.alpha)
        alignment = lm_loss(self.model, batch)
        loss = alignment + self.lamb * regulariser
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(
            {"train/alignment_loss": alignment.detach(), "train/harmful_drop": regulariser.detach()}, batch_size=size
        )
        return loss * size / batch.get("loss_normalizer", size)


class RepNoiseModule(SFTModule):
    def __init__(self, model, alpha: float, beta: float, **optimiser):
        super().__init__(model, **optimiser)
        self.alpha, self.beta = alpha, beta

    def training_step(self, batch, batch_idx):
        harmful, mlp_outputs = batch["harmful"], {}
        with forward_hooks(sublayers(self.model, "mlp", "repnoise"), mlp_outputs.__setitem__):
            out = self.model(
                input_ids=harmful["input_ids"], attention_mask=harmful["attention_mask"], output_hidden_states=True
            )
        answer = harmful["labels"] != IGNORE
        noise = torch.stack([representation_noise(mlp_outputs[i], answer) for i in sorted(mlp_outputs)])
        head, norm = self.model.get_output_embeddings(), self.model.get_decoder().norm
        harmful_nlls = torch.stack(
            [token_cross_entropy(out.logits, harmful["labels"])]
            + [token_cross_entropy(head(norm(h)), harmful["labels"]) for h in out.hidden_states]
        )
        retain = lm_loss(self.model, batch)
        loss = repnoise_loss(retain, harmful_nlls, noise, self.alpha, self.beta)
        size = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict(
            {
                "train/retain_nll": retain.detach(),
                "train/harmful_nll": harmful_nlls[0].detach(),
                "train/noise_mmd": noise.mean().detach(),
            },
            batch_size=size,
        )
        return loss * size / batch.get("loss_normalizer", size)


class AlignmentDefense(Method):
    """Trains a LoRA adapter (or the whole model) with `module(policy, *(method_cfg[key] for key in settings))`, on
    the stage's dataset, paired with `method.harmful`'s rows when `harmful`. The settings' ranges are in each one's
    YAML (checked by config.check_values)."""

    module: type[SFTModule]
    settings: tuple[str, ...]
    harmful: bool = True

    def train(self, stages, base, cfg, dataset_cfg):
        refuse_packing(stages.cfg, self.name)
        data = sft_data(stages, base, cfg, dataset_cfg)
        if self.harmful:
            data = WithHarmful(data, harmful_data(stages, base, cfg))
        policy = trainable(base.model, plain(cfg.lora))
        disable_dropout(policy)
        module = self.module(policy, *(cfg[key] for key in self.settings), **optimiser_settings(cfg))
        return policy, stages.fit(self.name, module, data, cfg.batch_size, cfg.epochs, stages.cfg.seed)


@method("vaccine")
class Vaccine(AlignmentDefense):
    module, settings, harmful = VaccineModule, ("rho",), False


@method("booster")
class Booster(AlignmentDefense):
    module, settings = BoosterModule, ("lamb", "alpha")


@method("repnoise")
class RepNoise(AlignmentDefense):
    module, settings = RepNoiseModule, ("alpha", "beta")
