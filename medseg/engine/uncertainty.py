"""How sure a prediction is, from the spread of its TTA flips and ensemble members.

Per voxel: the entropy of the averaged class probabilities (0 = certain, 1 = uniform over the
classes; for a region model's independent sigmoids, the mean binary entropy of its channels) and
the variance between the samples. Per case, the scores a reviewer sorts by: the mean
entropy inside the predicted foreground (where a mask's boundary is decided), and the agreement
between the samples' masks (their mean Dice with the consensus mask; 1 = every flip and member
agrees). With one sample (no TTA, one model) only the entropy exists.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

#: Probabilities below this count as zero in the entropy (0 · log 0 = 0).
_TINY = 1e-12


def normalised_entropy(probabilities: torch.Tensor, class_axis: int = 0) -> torch.Tensor:
    """Entropy of the class distribution at each position, divided by log K (so in [0, 1])."""
    classes = probabilities.shape[class_axis]
    if classes < 2:
        return torch.zeros_like(probabilities.select(class_axis, 0))
    p = probabilities.clamp(min=0)
    entropy = -(p * torch.log(p.clamp(min=_TINY))).sum(class_axis)
    return entropy / math.log(classes)


def normalised_binary_entropy(probabilities: torch.Tensor, class_axis: int = 0) -> torch.Tensor:
    """Mean over channels of each channel's binary entropy, divided by log 2 (so in [0, 1]): the
    entropy of independent sigmoid outputs (a region model's), which are no one distribution to
    take a class entropy of."""
    p = probabilities.clamp(0, 1)
    q = 1 - p
    entropy = -(p * torch.log(p.clamp(min=_TINY)) + q * torch.log(q.clamp(min=_TINY)))
    return entropy.mean(class_axis) / math.log(2)


def voxel_entropy(probabilities: torch.Tensor, sigmoid: bool = False) -> torch.Tensor:
    """Per-voxel normalised entropy of channel-first probabilities: of the class distribution
    (softmax), or with ``sigmoid`` the mean binary entropy of independent channels."""
    return normalised_binary_entropy(probabilities) if sigmoid else normalised_entropy(probabilities)


def mean_foreground_entropy(probabilities: torch.Tensor, labels: torch.Tensor | None = None,
                            sigmoid: bool = False) -> float:
    """Mean normalised entropy (:func:`voxel_entropy`) over the voxels predicted as foreground
    (label ≠ 0); over all voxels when nothing is predicted as foreground (a missed structure is
    uncertain everywhere or nowhere).

    Raises:
        ValueError: ``sigmoid`` without ``labels`` (independent channels have no arg-max label map).
    """
    if sigmoid and labels is None:
        raise ValueError("mean_foreground_entropy: sigmoid outputs need their decoded label map as labels")
    entropy = voxel_entropy(probabilities, sigmoid)
    labels = probabilities.argmax(0) if labels is None else labels
    inside = labels != 0
    return float(entropy[inside].mean() if bool(inside.any()) else entropy.mean())


def sample_agreement(samples: Sequence[torch.Tensor], consensus: torch.Tensor, foreground: Sequence[int]) -> float | None:
    """Mean Dice between each sample's label map and the consensus, over foreground labels present
    in either; None with fewer than two samples. A label absent from both counts as agreeing."""
    if len(samples) < 2:
        return None
    scores = []
    for sample in samples:
        per_label = []
        for value in foreground:
            a, b = sample == value, consensus == value
            size = int(a.sum()) + int(b.sum())
            per_label.append(1.0 if size == 0 else 2.0 * int((a & b).sum()) / size)
        scores.append(sum(per_label) / len(per_label) if per_label else 1.0)
    return float(sum(scores) / len(scores))
