"""PNG figures of the mechanistic study, one per analysis (each registered beside its analysis in study.py), drawn
from the numbers written to its JSON; plus the PCA grid of the activation space and the jailbreak rates."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _grid(rows: int, cols: int, size: float = 3.0):
    fig, axes = plt.subplots(rows, cols, figsize=(size * cols, size * rows), squeeze=False)
    return fig, axes


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def activation_pca(pca: dict, slices: dict, out: Path) -> None:
    tags = list(pca)
    fig, axes = _grid(len(tags), len(pca[tags[0]]))
    for r, tag in enumerate(tags):
        for c, coords in enumerate(pca[tag]):
            ax = axes[r][c]
            for name, part in slices.items():
                ax.scatter(coords[part, 0], coords[part, 1], s=4, alpha=0.5, label=name)
            ax.set_title(f"{tag} · layer {c}", fontsize=8)
            ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6, markerscale=3)
    _save(fig, out / "activation_space_pca.png")


def activation_space(space: dict, out: Path) -> None:
    fig, axes = _grid(1, 3, 3.6)
    for tag, values in space.items():
        layers = values["layers"]
        axes[0][0].plot([l["silhouette"] for l in layers], marker="o", label=tag)
        axes[0][1].plot([l["probe_accuracy"] for l in layers], marker="o", label=tag)
        suites = list(layers[0]["suites"])
        axes[0][2].plot(
            suites,
            [sum(l["suites"][s]["relative_l2"] for l in layers) / len(layers) for s in suites],
            marker="o",
            label=tag,
        )
    for ax, title in zip(
        axes[0], ("silhouette (safe vs unsafe)", "probe accuracy", "d_safe / (d_safe + d_unsafe), mean over layers")
    ):
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0][0].set_xlabel("layer", fontsize=7)
    axes[0][1].set_xlabel("layer", fontsize=7)
    axes[0][2].tick_params(axis="x", rotation=30)
    axes[0][0].legend(fontsize=6)
    _save(fig, out / "activation_space.png")


def column_space(column: dict, out: Path) -> None:
    keys = list(next(iter(column.values()))["matrices"])
    fig, axes = _grid(1, len(keys), 2.6)
    for c, key in enumerate(keys):
        for tag, values in column.items():
            axes[0][c].plot(values["matrices"][key]["sines"], label=tag)
        axes[0][c].set_title(key, fontsize=8)
        axes[0][c].set_xlabel("top direction (fine-tuned)", fontsize=6)
        axes[0][c].tick_params(labelsize=6)
    axes[0][0].set_ylabel("sin ∠ to pretrained top-k subspace", fontsize=6)
    axes[0][0].legend(fontsize=5)
    _save(fig, out / "column_space.png")


def row_space(row: dict, out: Path) -> None:
    tags = list(row)
    keys = list(row[tags[0]]["matrices"])
    fig, axes = _grid(len(tags), len(keys), 2.4)
    for r, tag in enumerate(tags):
        for c, key in enumerate(keys):
            values = row[tag]["matrices"][key]
            axes[r][c].plot(values["safe"], marker=".", label="safe")
            axes[r][c].plot(values["unsafe"], marker=".", label="unsafe")
            axes[r][c].set_title(f"{tag} · {key}", fontsize=7)
            axes[r][c].tick_params(labelsize=6)
    axes[0][0].set_ylabel("σ_j |cos(a, v_j)| of ΔW", fontsize=6)
    axes[0][0].legend(fontsize=6)
    _save(fig, out / "row_space.png")


def lipschitz(values: dict, out: Path) -> None:
    tags = list(values)
    fig, axes = _grid(1, len(tags), 2.6)
    for c, tag in enumerate(tags):
        for suite, v in values[tag].items():
            axes[0][c].hist(v["values"], bins=30, alpha=0.5, label=suite)
        axes[0][c].set_title(tag, fontsize=8)
        axes[0][c].tick_params(labelsize=6)
    axes[0][0].set_xlabel("‖∂ top logit / ∂ embeddings‖", fontsize=6)
    axes[0][0].legend(fontsize=6)
    _save(fig, out / "lipschitz.png")


def soft_tokens(values: dict, out: Path) -> None:
    counts = list(next(iter(values.values())))
    fig, axes = _grid(1, len(counts), 3.0)
    for c, n in enumerate(counts):
        for tag, per_n in values.items():
            success = per_n[n]["success"]
            axes[0][c].plot([int(s) for s in success], list(success.values()), marker="o", label=tag)
        axes[0][c].set_title(f"{n} soft token(s)", fontsize=8)
        axes[0][c].set_xlabel("steps", fontsize=7)
        axes[0][c].set_ylim(-0.02, 1.02)
        axes[0][c].tick_params(labelsize=6)
    axes[0][0].set_ylabel("attack success (exact harmful completion)", fontsize=6)
    axes[0][0].legend(fontsize=6)
    _save(fig, out / "soft_tokens.png")


def refusal_direction(values: dict, out: Path) -> None:
    """Per model, the refusal score of each layer's direction; then the causal test's rates, without and with the
    selected direction (ablated on unsafe prompts, added on safe ones)."""
    tags = list(values)
    causal = {tag: v["causal"] for tag, v in values.items() if "causal" in v}
    fig, axes = _grid(1, len(tags) + bool(causal), 2.6)
    for c, tag in enumerate(tags):
        v, ax = values[tag], axes[0][c]
        for key, label in (("ablated_unsafe", "unsafe, ablated"), ("added_safe", "safe, added")):
            ax.plot([float("nan") if l[key] is None else l[key] for l in v["layers"]], marker="o", label=label)
        ax.axhline(v["baseline"]["unsafe"], color="C0", ls=":", label="unsafe, baseline")
        ax.axhline(v["baseline"]["safe"], color="C1", ls=":", label="safe, baseline")
        ax.set_title(tag, fontsize=8)
        ax.set_xlabel("layer of the direction", fontsize=6)
        ax.tick_params(labelsize=6)
    axes[0][0].set_ylabel("refusal score (log-odds)", fontsize=6)
    axes[0][0].legend(fontsize=5)
    if causal:
        ax, bars = (
            axes[0][-1],
            (
                ("unsafe_compliance", "before", "unsafe compliance"),
                ("unsafe_compliance", "ablated", "… r ablated"),
                ("safe_refusal", "before", "safe refusal"),
                ("safe_refusal", "added", "… r added"),
            ),
        )
        width = 0.8 / len(bars)
        for k, (rate, when, label) in enumerate(bars):
            x = [i + k * width for i in range(len(causal))]
            ax.bar(x, [c[rate][when] for c in causal.values()], width, label=label)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(causal))], list(causal), fontsize=6)
        ax.set_ylim(0, 1)
        ax.set_title("generations, selected direction", fontsize=8)
        ax.legend(fontsize=5)
    _save(fig, out / "refusal_direction.png")


def jailbreak(values: dict, out: Path) -> None:
    tags = list(values)
    keys = list(values[tags[0]])
    fig, ax = plt.subplots(figsize=(1.2 * len(tags) + 2, 3))
    width = 0.8 / len(keys)
    for k, key in enumerate(keys):
        ax.bar([i + k * width for i in range(len(tags))], [values[t][key] or 0.0 for t in tags], width, label=key)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tags))], tags, fontsize=7, rotation=20)
    ax.legend(fontsize=6)
    ax.set_ylabel("rate", fontsize=7)
    _save(fig, out / "jailbreak.png")
