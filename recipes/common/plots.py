"""PNG plots (matplotlib, Agg backend): training curves and probe accuracies."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_training(records: Sequence[dict], path: str | Path, title: str = "CPC training") -> Path:
    """Loss against step, and the accuracy of each prediction step (last logged record, plus
    the curves of steps 1, 4, 8 and the last one)."""
    train = [r for r in records if "loss" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    if train:
        steps = [r["step"] for r in train]
        axes[0].plot(steps, [r["loss"] for r in train])
        n_pred = len(train[-1]["step_accuracy"])
        for k in sorted({1, min(4, n_pred), min(8, n_pred), n_pred}):
            axes[1].plot(steps, [r["step_accuracy"][k - 1] for r in train], label=f"k={k}")
        axes[1].legend()
        first, last = train[0]["step_accuracy"], train[-1]["step_accuracy"]
        ks = list(range(1, n_pred + 1))
        axes[2].plot(ks, first, "o--", label=f"step {train[0]['step']}")
        axes[2].plot(ks, last, "o-", label=f"step {train[-1]['step']}")
        axes[2].legend()
    axes[0].set(xlabel="training step", ylabel="InfoNCE loss (mean over k)", title=title)
    axes[1].set(xlabel="training step", ylabel="accuracy", title="prediction accuracy per k")
    axes[2].set(xlabel="prediction step k", ylabel="accuracy", title="accuracy against k")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_probes(results: dict[str, dict[str, float]], path: str | Path,
                title: str = "linear probes on held-out utterances") -> Path:
    """Grouped bars: one group per probe label, one bar per feature kind."""
    kinds = list(results)
    labels = sorted({label for kind in kinds for label in results[kind]})
    fig, ax = plt.subplots(figsize=(max(5, 2 + 1.8 * len(labels)), 4))
    width = 0.8 / max(len(kinds), 1)
    for i, kind in enumerate(kinds):
        xs = [j + i * width for j in range(len(labels))]
        ys = [results[kind].get(label, float("nan")) for label in labels]
        bars = ax.bar(xs, ys, width, label=kind)
        for bar, y in zip(bars, ys):
            ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y), ha="center",
                        va="bottom", fontsize=8)
    ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(labels))], labels)
    ax.set(ylabel="accuracy", ylim=(0, 1.05), title=title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
