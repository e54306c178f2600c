"""The pictures a run and a sweep leave behind: curves.png and pareto.png."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import EngFormatter, FuncFormatter  # noqa: E402


def _percent_axis(ax: plt.Axes) -> None:
    """Keep a percentage axis within 0-100 (matplotlib's margin showed 104 % at the top)."""
    lo, hi = ax.get_ylim()
    ax.set_ylim(max(lo, 0), min(hi, 100.5))


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
    _percent_axis(b)
    fig.suptitle(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_pareto(points: list[tuple[str, int, float]], path: Path, title: str) -> None:
    """Accuracy against trainable parameters: each configuration a numbered point, the names
    listed beside the axes (configurations of one size score alike, and their names written
    at the points overlapped), and the frontier of the best accuracy for its size drawn."""
    points = sorted(points, key=lambda p: (p[1], -p[2]))
    height = max(4.5, 1.0 + 0.13 * len(points))  # room for the list of names
    fig, ax = plt.subplots(figsize=(10, height))
    fig.subplots_adjust(left=0.08, right=0.62, bottom=0.5 / height, top=1 - 0.45 / height)
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(p[0].split("-")[0] for p in points))}
    for i, (label, params, acc) in enumerate(points, 1):
        ax.scatter(params, 100 * acc, color=colors[label.split("-")[0]], s=18)
        nth = sum(p[1] == params for p in points[:i - 1])  # same size: numbers left, right, ...
        ax.annotate(str(i), (params, 100 * acc), fontsize=7, textcoords="offset points",
                    xytext=(-4, 2) if nth % 2 else (4, 2), ha="right" if nth % 2 else "left")
    frontier, best = [], -1.0
    for _, params, acc in points:  # by size: a point is on the frontier if nothing smaller beats it
        if acc > best:
            frontier.append((params, 100 * acc))
            best = acc
    if frontier:  # (none when every configuration failed)
        ax.step(*zip(*frontier), where="post", color="grey", lw=0.8, alpha=0.6)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel="accuracy (%)")
    eng = EngFormatter(sep="")  # 10k, 20k, 50k, 100k: at most three labels a decade
    ax.xaxis.set_major_formatter(eng)
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda x, _: eng(x) if f"{x:.0e}"[0] in "25" else ""))
    _percent_axis(ax)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    names = [f"{i:>2}  {100 * acc:5.1f} %  {label}" for i, (label, _, acc) in enumerate(points, 1)]
    fig.text(0.64, 1 - 0.45 / height, "\n".join(names), va="top", family="monospace", fontsize=7)
    fig.savefig(path, dpi=100)
    plt.close(fig)
