"""Regression metrics against their definitions (and scipy / scikit-learn where they have them)."""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import cohen_kappa_score, r2_score

from medseg.tasks.regression.metrics import quadratic_weighted_kappa, regression_scores
from medseg.tasks.regression.normalisation import TargetNormaliser


def test_scores_match_their_definitions_per_target_and_on_average() -> None:
    rng = np.random.default_rng(3)
    true = np.stack([rng.normal(3.0, 0.5, 23), rng.normal(-10.0, 4.0, 23)], axis=1)
    predicted = true + rng.normal(0.2, 0.3, true.shape)
    norm = TargetNormaliser.fit(true, ["a_ml", "b"], "zscore")
    scores = regression_scores(predicted, true, norm, "test")
    for j, column in enumerate(("a_ml", "b")):
        p, t = predicted[:, j], true[:, j]
        assert math.isclose(scores[f"test/mae/{column}"], np.abs(p - t).mean())
        assert math.isclose(scores[f"test/rmse/{column}"], np.sqrt(((p - t) ** 2).mean()))
        assert math.isclose(scores[f"test/r2/{column}"], r2_score(t, p))
        assert math.isclose(scores[f"test/pearson/{column}"], pearsonr(p, t)[0], rel_tol=1e-9)
        assert math.isclose(scores[f"test/spearman/{column}"], spearmanr(p, t)[0], rel_tol=1e-9)
        assert math.isclose(scores[f"test/bias/{column}"], (p - t).mean())
    assert math.isclose(scores["test/mae"], (scores["test/mae/a_ml"] + scores["test/mae/b"]) / 2)
    assert math.isclose(scores["test/neg_nmae"], -(np.abs(predicted - true) / norm.std).mean())
    assert scores["test/cases"] == 23 and "test/qwk" not in scores


def test_constant_targets_give_nan_r2_and_correlations_not_an_error() -> None:
    true = np.full((4, 1), 2.0)
    scores = regression_scores(true + 0.1, true, TargetNormaliser.fit(true, ["t"], "zscore"), "val")
    assert math.isnan(scores["val/r2"]) and math.isnan(scores["val/pearson"]) and math.isnan(scores["val/spearman"])
    assert math.isclose(scores["val/mae"], 0.1)


def test_ordinal_targets_add_the_quadratic_weighted_kappa_of_rounded_clipped_predictions() -> None:
    true = np.array([0, 1, 2, 3, 4, 4, 2, 0], dtype=float)
    predicted = np.array([-0.7, 1.4, 2.6, 2.9, 5.8, 3.6, 1.2, 0.4])
    expected = cohen_kappa_score(true.astype(int), [0, 1, 3, 3, 4, 4, 1, 0], weights="quadratic")
    assert math.isclose(quadratic_weighted_kappa(predicted, true, 0, 4), expected)
    norm = TargetNormaliser.fit(true[:, None], ["grade"], "zscore", ordinal=True)
    scores = regression_scores(predicted[:, None], true[:, None], norm, "test")
    assert math.isclose(scores["test/qwk"], expected) and math.isclose(scores["test/qwk/grade"], expected)
    assert scores["test/acc"] == 6 / 8  # rounded 0 1 3 3 4 4 1 0 against 0 1 2 3 4 4 2 0
