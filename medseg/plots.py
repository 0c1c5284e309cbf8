"""Figures people would rather look at than read: learning curves and overlays.

Each figure is saved as a PNG file, except those logged at every validation
(:func:`contour_overlay_image`, :func:`image_grid`, :func:`reconstruction_image`), which come back as
RGB arrays for the MLflow run page's image slider.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def _pixels(fig: plt.Figure) -> np.ndarray:
    """The figure as an RGB uint8 array (H, W, 3), exactly as :func:`_save` would write it
    (cropped to what is drawn, so a long title is not cut off)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    buffer.seek(0)
    with Image.open(buffer) as png:
        return np.asarray(png.convert("RGB"))


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
    return _save(_overlay_figure(image, truth, prediction, title, num_classes), path)


def contour_overlay_image(image: np.ndarray, truth: np.ndarray, prediction: np.ndarray, title: str,
                          num_classes: int) -> np.ndarray:
    """One square panel, as an RGB array: the prediction filled, the truth outlined in the same
    colours, on the axial slice with the most truth foreground (arrays are x, y[, z]).

    Square on purpose: the MLflow run page shows logged images as 256-pixel thumbnails, where three
    panels side by side would be slivers. The slice depends on the truth alone (when it has any
    foreground), so every epoch's picture of a case shows the same slice.
    """
    if image.ndim == 3:
        z = _most_foreground_slice(truth if truth.any() else prediction)
        image, truth, prediction = image[..., z], truth[..., z], prediction[..., z]
    cmap = plt.get_cmap("tab10", max(num_classes, 2))
    fig, ax = plt.subplots(figsize=(3.0, 3.2))
    ax.imshow(image.T, cmap="gray", origin="lower")
    filled = np.ma.masked_where(prediction.T == 0, prediction.T)
    ax.imshow(filled, cmap=cmap, vmin=0, vmax=max(num_classes - 1, 1), alpha=0.45, origin="lower",
              interpolation="nearest")
    for value in range(1, num_classes):
        if (truth == value).any():
            ax.contour((truth == value).T.astype(np.float32), levels=[0.5], colors=[cmap(value)], linewidths=1.4,
                       origin="lower")
    ax.axis("off")
    ax.set_title(f"{title}\nfill: prediction, outline: truth", fontsize=9)
    fig.tight_layout()
    return _pixels(fig)


def _most_foreground_slice(reference: np.ndarray) -> int:
    """Index along the last axis of the slice with the most foreground in ``reference``."""
    return int(np.argmax((reference > 0).reshape(-1, reference.shape[-1]).sum(0)))


def _overlay_figure(image: np.ndarray, truth: np.ndarray | None, prediction: np.ndarray, title: str,
                    num_classes: int) -> plt.Figure:
    if image.ndim == 3:
        z = _most_foreground_slice(truth if truth is not None else prediction)
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
    return fig


# ----------------------------------------------------------------------------------- classification


def roc_curves(probs: np.ndarray, labels: np.ndarray, names: Mapping[int, str], path: Path, title: str) -> Path:
    """ROC curve of the positive class (binary) or of each class against the rest, with AUCs."""
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    classes = [1] if len(names) == 2 else list(names)
    for c in classes:
        truth = labels == c
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        ax.plot(fpr, tpr, label=f"{names[c]} (AUC {roc_auc_score(truth, probs[:, c]):.3f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("1 - specificity (false positive rate)")
    ax.set_ylabel("sensitivity (true positive rate)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def confusion_matrix_plot(matrix: np.ndarray, names: Sequence[str], path: Path, title: str) -> Path:
    """Counts, with each row's share (recall of that true class) as the colour."""
    rows = matrix.sum(1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    size = 1.2 + 0.8 * len(names)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]}\n{share[i, j]:.0%}", ha="center", va="center", fontsize=8,
                    color="white" if share[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.046)
    return _save(fig, path)


def reliability_diagram(table: Sequence[Mapping[str, float]], ece: float, path: Path, title: str) -> Path:
    """Accuracy against confidence per bin (the calibration figure), with the ECE in the title."""
    fig, ax = plt.subplots(figsize=(4.8, 4.5))
    centres = [(b["low"] + b["high"]) / 2 for b in table]
    width = table[0]["high"] - table[0]["low"] if table else 0.1
    ax.bar(centres, [0 if np.isnan(b["accuracy"]) else b["accuracy"] for b in table], width=width * 0.95,
           edgecolor="black", color="tab:blue", alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8, label="perfect calibration")
    for x, b in zip(centres, table):
        if b["count"]:
            ax.text(x, 0.02, str(b["count"]), ha="center", fontsize=6, rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title}: ECE {ece:.3f}")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def embedding_map(points: np.ndarray, labels: np.ndarray, names: Mapping[int, str], path: Path, title: str) -> Path:
    """2-D embedding (t-SNE) of features, coloured by true class."""
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    colours = plt.get_cmap("tab10")  # distinct hues; a resampled map would give near-identical blues for 2 classes
    for c, name in names.items():
        chosen = labels == c
        if chosen.any():
            ax.scatter(points[chosen, 0], points[chosen, 1], s=6, color=colours(c % 10), label=name, alpha=0.7)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(loc="best", fontsize=8, markerscale=2)
    return _save(fig, path)


def reconstruction_grid(baseline: Any, output: Any, target: Any, path: Path, title: str,
                        baseline_name: str = "input") -> Path:
    """Baseline, network output, target and both error maps on the middle slice of (N, 1, H, W) stacks."""
    return _save(_reconstruction_figure(baseline, output, target, title, baseline_name), path)


def reconstruction_image(baseline: Any, output: Any, target: Any, title: str, baseline_name: str = "input") -> np.ndarray:
    """Baseline, network output, target and the network's error on the middle slice, two by two,
    as an RGB array: square, so that the MLflow run page's 256-pixel thumbnail stays legible."""
    return _pixels(_reconstruction_figure(baseline, output, target, title, baseline_name, square=True))


def _reconstruction_figure(baseline: Any, output: Any, target: Any, title: str, baseline_name: str,
                           square: bool = False) -> plt.Figure:
    index = len(target) // 2
    base, out, truth = (np.asarray(a[index, 0], dtype=np.float32) for a in (baseline, output, target))
    vmax = float(truth.max()) or 1.0
    err_max = float(max(np.abs(base - truth).max(), np.abs(out - truth).max())) or 1.0
    panels = [(baseline_name, base, "gray", 0, vmax), ("network", out, "gray", 0, vmax), ("target", truth, "gray", 0, vmax),
              (f"|{baseline_name} - target|", np.abs(base - truth), "magma", 0, err_max),
              ("|network - target|", np.abs(out - truth), "magma", 0, err_max)]
    if square:
        panels = [panels[0], panels[1], panels[2], panels[4]]
    columns = 2 if square else len(panels)
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.0 * columns, 3.1 * rows + 0.3), squeeze=False)
    for ax, (name, image, cmap, low, high) in zip(axes.flat, panels):
        ax.imshow(image.T, cmap=cmap, vmin=low, vmax=high, origin="lower")  # arrays are (x, y)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(images: Sequence[np.ndarray], titles: Sequence[str], correct: Sequence[bool], title: str) -> np.ndarray:
    """Grey 2-D images (x, y) in a square grid, each under its caption, green when ``correct``, else
    red; as an RGB array (the classification preview)."""
    columns = max(1, math.ceil(math.sqrt(len(images))))
    rows = max(1, -(-len(images) // columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, caption, right in zip(axes.flat, images, titles, correct):
        ax.imshow(np.asarray(image, dtype=np.float32).T, cmap="gray", origin="lower")
        ax.set_title(caption, fontsize=8, color="tab:green" if right else "tab:red")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return _pixels(fig)


def bland_altman_plot(true: np.ndarray, predicted: np.ndarray, path: Path, title: str, units: str = "") -> Path:
    """Bland-Altman: each case's difference (predicted - true) against its mean, with the bias and
    the 95% limits of agreement (bias ± 1.96 SD of the differences)."""
    true, predicted = np.asarray(true, dtype=float), np.asarray(predicted, dtype=float)
    mean, difference = (true + predicted) / 2, predicted - true
    bias = float(difference.mean())
    spread = 1.96 * float(difference.std(ddof=1)) if len(difference) > 1 else 0.0
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    ax.scatter(mean, difference, s=12, alpha=0.7)
    ax.axhline(bias, color="black", linewidth=1, label=f"bias {bias:.3g}")
    for limit in (bias - spread, bias + spread):
        ax.axhline(limit, color="grey", linestyle="--", linewidth=0.8)
    ax.plot([], [], color="grey", linestyle="--", label=f"limits of agreement ±{spread:.3g}")
    suffix = f" ({units})" if units else ""
    ax.set_xlabel(f"mean of predicted and true{suffix}")
    ax.set_ylabel(f"predicted - true{suffix}")
    ax.set_title(title, fontsize=9)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)
