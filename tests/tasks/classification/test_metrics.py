"""Classification metrics against hand-computed examples; losses and probability heads."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.engine.distributed import DistContext
from medseg.tasks.classification.config import ClassificationLossConfig
from medseg.tasks.classification.metrics import (
    ClassificationPredictions,
    OrdinalLoss,
    balanced_class_weights,
    class_probabilities,
    classification_scores,
    confusion_counts,
    create_classification_loss,
    expected_calibration_error,
)


def test_binary_auc_confusion_sensitivity_specificity_by_hand() -> None:
    labels = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8])
    out = classification_scores(np.stack([1 - p1, p1], 1), labels, {0: "benign", 1: "malignant"}, prefix="test")
    # 4 positive/negative pairs, 3 ranked correctly: AUC 3/4. Arg-max: [0, 0, 0, 1] -> TN 2, FP 0, FN 1, TP 1.
    assert out["test/auc"] == pytest.approx(0.75)
    assert out["test/acc"] == pytest.approx(0.75)
    assert out["test/sensitivity"] == pytest.approx(0.5)
    assert out["test/specificity"] == pytest.approx(1.0)
    assert out["test/f1"] == pytest.approx(2 * 1.0 * 0.5 / 1.5)
    assert out["test/recall/benign"] == pytest.approx(1.0)
    assert out["test/recall/malignant"] == pytest.approx(0.5)
    assert out["test/balanced_acc"] == pytest.approx(0.75)


def test_multiclass_one_vs_rest_macro_auc_by_hand() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[.7, .2, .1], [.2, .6, .2], [.1, .3, .6], [.3, .4, .3], [.5, .3, .2], [.2, .2, .6]])
    out = classification_scores(probs, labels, {0: "a", 1: "b", 2: "c"})
    # class a: 7 of 8 pairs; b: 6.5 of 8 (one tie); c: 8 of 8
    assert out["val/auc"] == pytest.approx((7 / 8 + 6.5 / 8 + 1) / 3)
    assert out["val/acc"] == pytest.approx(4 / 6)  # arg-max [0, 1, 2, 1, 0, 2]
    assert out["val/recall/c"] == 1.0 and out["val/recall/a"] == 0.5


def test_confusion_matrix_by_hand() -> None:
    labels = np.array([0, 1, 2, 0, 1, 2, 1])
    probs = np.array([[.7, .2, .1], [.2, .6, .2], [.1, .3, .6], [.3, .4, .3], [.5, .3, .2], [.2, .2, .6],
                      [.1, .1, .8]])
    # arg-max [0, 1, 2, 1, 0, 2, 2]: rows are the true class, columns the prediction
    assert confusion_counts(probs, labels, 3).tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 2]]
    # a class that never occurs still gets its row and column
    assert confusion_counts(probs[:2, :], labels[:2], 3).tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_expected_calibration_error_by_hand() -> None:
    probs = np.array([[.15, .85], [.25, .75], [.65, .35], [.45, .55]])
    labels = np.array([1, 0, 0, 1])  # correct, wrong, correct, correct
    ece, table = expected_calibration_error(probs, labels, bins=10)
    assert ece == pytest.approx((0.15 + 0.75 + 0.35 + 0.45) / 4)
    assert sum(b["count"] for b in table) == 4


def test_missing_class_gives_nan_auc_not_a_crash() -> None:
    out = classification_scores(np.array([[.3, .7], [.2, .8]]), np.array([1, 1]), {0: "a", 1: "b"})
    assert np.isnan(out["val/auc"]) and out["val/acc"] == 1.0


def test_ordinal_metrics_and_probabilities() -> None:
    logits = torch.tensor([[3.0, -1.0, 2.0], [-4.0, -5.0, -6.0]])  # non-monotone on purpose
    probs = class_probabilities(logits, "ordinal")
    assert probs.shape == (2, 4)
    assert torch.all(probs >= 0) and torch.allclose(probs.sum(1), torch.ones(2))
    out = classification_scores(np.array([[.1, .8, .1], [.1, .1, .8], [.8, .1, .1]]), np.array([1, 1, 0]),
                                {0: "g0", 1: "g1", 2: "g2"}, ordinal=True)
    assert out["val/mae"] == pytest.approx(1 / 3)
    assert -1 <= out["val/qwk"] <= 1


def test_balanced_weights_follow_scikit_learn() -> None:
    assert balanced_class_weights([0, 1, 1, 1], 2) == pytest.approx([2.0, 2 / 3])


@pytest.mark.parametrize("name", ["ce", "focal", "hinge"])
def test_losses_train_on_logits_and_labels(name: str) -> None:
    torch.manual_seed(0)
    cfg = ClassificationLossConfig(name=name, label_smoothing=0.1 if name == "ce" else 0.0)
    loss = create_classification_loss(cfg, [1.0, 2.0, 0.5])
    logits = torch.randn(5, 3, requires_grad=True)
    value = loss(logits, torch.tensor([0, 1, 2, 1, 0]))
    value.backward()
    assert value.ndim == 0 and torch.isfinite(value) and logits.grad is not None


def test_weighted_cross_entropy_scales_samples_and_splits_like_one_batch() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 1, 1])
    loss = create_classification_loss(ClassificationLossConfig(name="ce"), [3.0, 1.0])
    per_sample = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    assert loss(logits, labels) == pytest.approx(float((per_sample * torch.tensor([3.0, 1.0])[labels]).mean()))
    # two halves (two DDP processes) average to the whole batch's loss
    halves = (loss(logits[:3], labels[:3]) + loss(logits[3:], labels[3:])) / 2
    assert float(halves) == pytest.approx(float(loss(logits, labels)))
    unweighted = create_classification_loss(ClassificationLossConfig(name="ce"), None)(logits, labels)
    assert unweighted == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))


def test_ordinal_loss_prefers_the_right_grade() -> None:
    loss = OrdinalLoss()
    labels = torch.tensor([2])
    right = loss(torch.tensor([[5.0, 5.0, -5.0]]), labels)  # P(>0), P(>1) high, P(>2) low: grade 2
    wrong = loss(torch.tensor([[-5.0, -5.0, -5.0]]), labels)
    assert right < wrong


def test_predictions_sort_by_case_id_when_gathered() -> None:
    p = ClassificationPredictions()
    p.add(["b", "a"], torch.tensor([1, 0]), torch.tensor([[.2, .8], [.9, .1]]))
    gathered = p.gather(DistContext())
    assert gathered.case_ids == ["a", "b"] and gathered.labels == [0, 1]
    assert gathered.prob_array()[0].tolist() == pytest.approx([.9, .1])


def test_an_empty_share_joins_the_gather() -> None:
    class TwoProcesses:  # all_gather_object's result when process 1 had no cases
        def gather(self, value):  # noqa: ANN001, ANN202
            return [value, ([], [], np.zeros((0, 0)), None)]

    p = ClassificationPredictions()
    p.add(["a"], torch.tensor([1]), torch.tensor([[.3, .7]]))
    gathered = p.gather(TwoProcesses())
    assert gathered.case_ids == ["a"] and gathered.prob_array().shape == (1, 2)
