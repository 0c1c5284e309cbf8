"""Figures people would rather look at than read: learning curves and overlays."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from medseg.io.atomic import atomic_path  # noqa: E402


def _save(fig: plt.Figure, path: Path) -> Path:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def learning_curve(history: Sequence[Mapping[str, float]], path: Path, metric: str = "val/dice_mean") -> Path:
    """Training loss and a validation metric against epoch."""
    fig, ax = plt.subplots(figsize=(7, 4))
    epochs = [h["epoch"] for h in history if "train/loss" in h]
    ax.plot(epochs, [h["train/loss"] for h in history if "train/loss" in h], label="train/loss", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    val = [(h["epoch"], h[metric]) for h in history if metric in h]
    if val:
        ax2 = ax.twinx()
        ax2.plot(*zip(*val), marker="o", label=metric, color="tab:orange")
        ax2.set_ylabel(metric)
        ax2.set_ylim(0, 1)
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    ax.set_title("learning curve")
    return _save(fig, path)


def overlay(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, path: Path, title: str,
            num_classes: int) -> Path:
    """Image, truth and prediction on the axial slice with the most foreground (arrays are x, y[, z])."""
    if image.ndim == 3:
        reference = truth if truth is not None else prediction
        z = int(np.argmax((reference > 0).reshape(-1, reference.shape[-1]).sum(0)))
        image, prediction = image[..., z], prediction[..., z]
        truth = truth[..., z] if truth is not None else None
    panels = [("image", None), ("truth", truth), ("prediction", prediction)] if truth is not None else [
        ("image", None), ("prediction", prediction)]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4))
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    for ax, (name, mask) in zip(axes, panels):
        ax.imshow(image.T, cmap="gray", origin="lower")
        if mask is not None:
            shown = np.ma.masked_where(mask.T == 0, mask.T)
            ax.imshow(shown, cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1), alpha=0.5, origin="lower",
                      interpolation="nearest")
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    return _save(fig, path)
