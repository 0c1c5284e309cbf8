"""Classification losses, output probabilities and metrics.

Metrics follow the MedMNIST evaluator (AUC; ACC at the arg-max) and the clinical vocabulary
(sensitivity, specificity, per-class recall). Binary tasks treat class 1 as positive; multi-class
AUC is one-vs-rest, macro-averaged. Predictions are gathered across processes before scoring,
so every process count gives the same numbers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.losses import FocalLoss
from sklearn.metrics import cohen_kappa_score, confusion_matrix, f1_score, roc_auc_score
from torch import nn
from torch.nn import functional as F

from medseg.engine.calibration import expected_calibration_error
from medseg.tasks.classification.config import ClassificationLoss, ClassificationLossConfig


def balanced_class_weights(labels: Sequence[int], num_classes: int) -> list[float]:
    """``n / (k * count_c)``, scikit-learn's "balanced" weights; absent classes get 0."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    total = counts.sum()
    return [float(total / (num_classes * c)) if c else 0.0 for c in counts]


def output_count(cfg: ClassificationLossConfig, num_classes: int) -> int:
    """Logits the network must produce: one per class, or K-1 "grade > k" logits for ``ordinal``."""
    return num_classes - 1 if cfg.name == ClassificationLoss.ORDINAL else num_classes


class WeightedCrossEntropy(nn.Module):
    """Cross-entropy (with label smoothing) where a class weight scales each sample's loss, then
    the plain batch mean (Keras's sample weights).

    torch's ``CrossEntropyLoss(weight=...)`` divides by the batch's sum of weights instead, which
    depends on which samples share a batch: a batch split across DDP processes would then not
    give the gradient of the whole batch. With "balanced" weights, whose mean over the training
    set is 1, the loss keeps the scale of an unweighted one.
    """

    weight: torch.Tensor | None  # registered as a buffer (moves with the module); declared for type checkers

    def __init__(self, weight: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("weight", weight)
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        per_sample = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=self.label_smoothing)
        if self.weight is not None:
            per_sample = per_sample * self.weight[labels]
        return per_sample.mean()


class OrdinalLoss(nn.Module):
    """Cumulative-link loss (CORAL-style): K-1 binary "label > k" tasks with logistic losses."""

    weight: torch.Tensor | None  # registered as a buffer (moves with the module); declared for type checkers

    def __init__(self, weight: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        thresholds = torch.arange(logits.shape[1], device=logits.device)
        targets = (labels[:, None] > thresholds[None, :]).to(logits.dtype)
        per_sample = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").sum(1)
        if self.weight is not None:  # per-sample scaling and a plain mean, as in WeightedCrossEntropy
            per_sample = per_sample * self.weight[labels]
        return per_sample.mean()


class _FocalOnLabels(nn.Module):
    """MONAI's focal loss on (B, C) logits and (B,) integer labels."""

    def __init__(self, gamma: float, weight: torch.Tensor | None):
        super().__init__()
        self.focal = FocalLoss(to_onehot_y=True, use_softmax=True, gamma=gamma, weight=weight)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.focal(logits, labels[:, None])


def create_classification_loss(cfg: ClassificationLossConfig, class_weights: Sequence[float] | None) -> nn.Module:
    """The configured loss on ``(B, outputs)`` logits and ``(B,)`` integer labels.

    Every loss is a plain mean over the batch's samples (class weights scale samples), so a
    batch split across processes averages to the loss of the whole batch.
    """
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    if cfg.name == ClassificationLoss.FOCAL:
        return _FocalOnLabels(cfg.focal_gamma, weight)
    if cfg.name == ClassificationLoss.HINGE:
        return nn.MultiMarginLoss(margin=cfg.hinge_margin, weight=weight)
    if cfg.name == ClassificationLoss.ORDINAL:
        return OrdinalLoss(weight)
    return WeightedCrossEntropy(weight, cfg.label_smoothing)


def class_probabilities(logits: torch.Tensor, head: str) -> torch.Tensor:
    """Per-class probabilities from logits: softmax, or from an ordinal head's ``P(label > k)``.

    The ordinal head's cumulative probabilities are made non-increasing (running minimum)
    before taking differences, so every class probability is >= 0 and they sum to 1.
    """
    logits = logits.float()
    if head == "ordinal":
        above = torch.cummin(torch.sigmoid(logits), dim=1).values
        ones = torch.ones_like(above[:, :1])
        zeros = torch.zeros_like(above[:, :1])
        cumulative = torch.cat([ones, above, zeros], dim=1)  # P(label > k-1) for k = 0..K
        return cumulative[:, :-1] - cumulative[:, 1:]
    return torch.softmax(logits, dim=1)


def confusion_counts(probs: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts of true class (rows) against the arg-max prediction (columns)."""
    return confusion_matrix(labels, probs.argmax(1), labels=list(range(num_classes)))


def classification_scores(probs: np.ndarray, labels: np.ndarray, names: Mapping[int, str], *, ordinal: bool = False,
                          calibration_bins: int = 10, prefix: str = "val") -> dict[str, float]:
    """Every classification metric for a set of predictions.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) true classes.
        names: class index -> name.
        ordinal: also MAE and quadratic-weighted kappa (ordered grades).
        calibration_bins: bins of the expected calibration error.
        prefix: metric name prefix (``val``, ``test``).

    Returns:
        ``{prefix}/acc``, ``/auc``, ``/f1``, ``/sensitivity``, ``/specificity``, ``/balanced_acc``,
        ``/ece``, ``/recall/<class>`` (and ``/mae``, ``/qwk``). AUC is NaN when a class is missing.
    """
    k = len(names)
    pred = probs.argmax(1)
    cm = confusion_counts(probs, labels, k)
    out = {f"{prefix}/acc": float((pred == labels).mean()) if len(labels) else float("nan")}
    present = np.unique(labels)
    if len(present) < 2:
        out[f"{prefix}/auc"] = float("nan")
    elif k == 2:
        out[f"{prefix}/auc"] = float(roc_auc_score(labels, probs[:, 1]))
    elif len(present) == k:
        out[f"{prefix}/auc"] = float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(k))))
    else:  # one-vs-rest over the classes that occur: a missing class has no ROC curve
        out[f"{prefix}/auc"] = float(np.mean([roc_auc_score(labels == c, probs[:, c]) for c in present]))
    tp = np.diag(cm).astype(np.float64)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    tn = cm.sum() - tp - fn - fp
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = tp / (tp + fn)
        specificity = tn / (tn + fp)
    if k == 2:
        out[f"{prefix}/f1"] = float(f1_score(labels, pred, pos_label=1, zero_division=0))
        out[f"{prefix}/sensitivity"], out[f"{prefix}/specificity"] = float(recall[1]), float(specificity[1])
    else:
        out[f"{prefix}/f1"] = float(f1_score(labels, pred, average="macro", labels=list(range(k)), zero_division=0))
        out[f"{prefix}/sensitivity"] = float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")
        out[f"{prefix}/specificity"] = float(np.nanmean(specificity)) if np.isfinite(specificity).any() else float("nan")
    out[f"{prefix}/balanced_acc"] = float(np.nanmean(recall)) if np.isfinite(recall).any() else float("nan")
    for index, name in names.items():
        out[f"{prefix}/recall/{name}"] = float(recall[index])
    out[f"{prefix}/ece"] = expected_calibration_error(probs, labels, calibration_bins)[0]
    if ordinal:
        out[f"{prefix}/mae"] = float(np.abs(pred - labels).mean())
        out[f"{prefix}/qwk"] = float(cohen_kappa_score(labels, pred, weights="quadratic", labels=list(range(k))))
    return out


class ClassificationPredictions:
    """Collects case ids, labels, probabilities (and optionally features) over a pass; gathers
    them from every process of a distributed run before scoring."""

    def __init__(self) -> None:
        self.case_ids: list[str] = []
        self.labels: list[int] = []
        self.probs: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.logits: list[torch.Tensor] = []  # kept by this process only (calibration), never gathered

    def add(self, case_ids: Sequence[str], labels: torch.Tensor, probs: torch.Tensor,
            features: torch.Tensor | None = None, logits: torch.Tensor | None = None) -> None:
        self.case_ids.extend(str(c) for c in case_ids)
        self.labels.extend(int(v) for v in labels.reshape(-1).tolist())
        self.probs.append(probs.detach().float().cpu().numpy())
        if logits is not None:
            self.logits.append(logits.detach().float().cpu())
        if features is not None:
            self.features.append(features.detach().float().cpu().numpy())

    def gather(self, ctx: Any) -> ClassificationPredictions:
        """All processes' predictions, sorted by case id (every process gets the same)."""
        parts = ctx.gather((self.case_ids, self.labels, self.prob_array(), self.feature_array()))
        out = ClassificationPredictions()
        for case_ids, labels, probs, features in parts:
            if not case_ids:  # a process whose share of the cases is empty
                continue
            out.case_ids.extend(case_ids)
            out.labels.extend(labels)
            out.probs.append(probs)
            if features is not None:
                out.features.append(features)
        order = np.argsort(out.case_ids, kind="stable")
        probs, feats = out.prob_array(), out.feature_array()
        out.case_ids = [out.case_ids[i] for i in order]
        out.labels = [out.labels[i] for i in order]
        out.probs = [probs[order]] if len(order) else []
        out.features = [feats[order]] if feats is not None and len(order) else []
        return out

    def prob_array(self) -> np.ndarray:
        return np.concatenate(self.probs) if self.probs else np.zeros((0, 0))

    def feature_array(self) -> np.ndarray | None:
        return np.concatenate(self.features) if self.features else None

    def logit_tensor(self) -> torch.Tensor:
        return torch.cat(self.logits) if self.logits else torch.zeros(0, 2)

    def label_array(self) -> np.ndarray:
        return np.asarray(self.labels, dtype=np.int64)
