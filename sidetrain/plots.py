"""The pictures a run and a sweep leave behind: curves.png and pareto.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """Train/val loss and val accuracy per epoch."""
    if not history:
        return
    epochs = [h["epoch"] for h in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    # fixed margins: tight_layout measured half of the 0.4 s this took, paid by every run
    fig.subplots_adjust(left=0.07, right=0.98, bottom=0.15, top=0.8, wspace=0.25)
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h["val_loss"] for h in history], label="val")
    a.set(xlabel="epoch", ylabel="loss", title="loss")
    a.legend()
    b.plot(epochs, [100 * h["val_acc"] for h in history], color="tab:green")
    b.set(xlabel="epoch", ylabel="val accuracy (%)", title="val accuracy")
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto(points: list[tuple[str, int, float]], path: Path, title: str) -> None:
    """Accuracy against trainable parameters, one labelled point per configuration."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    tied: dict[tuple[int, float], list[str]] = {}  # configurations on one point share a label
    for label, params, acc in points:
        tied.setdefault((params, 100 * acc), []).append(label)
    for (params, acc), labels in tied.items():
        ax.scatter(params, acc)
        ax.annotate("\n".join(labels), (params, acc), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="accuracy (%)")
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0), min(hi, 100.5))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
