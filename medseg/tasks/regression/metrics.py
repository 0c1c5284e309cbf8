"""Regression metrics in the targets' own units, per target and averaged over targets:
MAE, RMSE, R², Pearson and Spearman correlation, Bland-Altman bias and limits of agreement, and
for ordinal targets the quadratic-weighted kappa and the accuracy of the rounded predictions (one table)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np

from medseg.tasks.regression.normalisation import TargetNormaliser

Metric = Callable[[np.ndarray, np.ndarray], float]


def mae(predicted: np.ndarray, true: np.ndarray) -> float:
    from sklearn.metrics import mean_absolute_error

    return float(mean_absolute_error(true, predicted))


def rmse(predicted: np.ndarray, true: np.ndarray) -> float:
    from sklearn.metrics import mean_squared_error

    return float(np.sqrt(mean_squared_error(true, predicted)))


def r2(predicted: np.ndarray, true: np.ndarray) -> float:
    """Coefficient of determination, ``1 - SS_res / SS_tot``: NaN when the targets are all equal."""
    from sklearn.metrics import r2_score

    return float(r2_score(true, predicted)) if len(true) > 1 and np.ptp(true) > 0 else float("nan")


def _correlation(test: Callable, predicted: np.ndarray, true: np.ndarray) -> float:
    """scipy's correlation ``test``: NaN for fewer than two cases or a constant side (where scipy warns)."""
    if len(true) < 2 or np.ptp(true) == 0 or np.ptp(predicted) == 0:
        return float("nan")
    return float(test(predicted, true)[0])


def pearson(predicted: np.ndarray, true: np.ndarray) -> float:
    """Linear correlation (scipy.stats.pearsonr)."""
    from scipy.stats import pearsonr

    return _correlation(pearsonr, predicted, true)


def spearman(predicted: np.ndarray, true: np.ndarray) -> float:
    """Rank correlation (scipy.stats.spearmanr)."""
    from scipy.stats import spearmanr

    return _correlation(spearmanr, predicted, true)


def bias(predicted: np.ndarray, true: np.ndarray) -> float:
    """Bland-Altman bias: the mean of predicted minus true."""
    return float(np.mean(predicted - true))


def limits_of_agreement(predicted: np.ndarray, true: np.ndarray) -> float:
    """Bland-Altman half-width: 1.96 standard deviations of predicted minus true."""
    return float(1.96 * np.std(predicted - true, ddof=1)) if len(true) > 1 else float("nan")


#: metric name -> metric(predicted, true), in the targets' units.
REGRESSION_METRICS: dict[str, Metric] = {"mae": mae, "rmse": rmse, "r2": r2, "pearson": pearson,
                                         "spearman": spearman, "bias": bias, "loa": limits_of_agreement}


def quadratic_weighted_kappa(predicted: np.ndarray, true: np.ndarray, low: float, high: float) -> float:
    """Cohen's kappa with quadratic weights of the predictions rounded to the grades ``low..high``."""
    from sklearn.metrics import cohen_kappa_score

    grades = np.clip(np.rint(predicted), low, high).astype(int)
    truth = np.rint(true).astype(int)
    if len(np.union1d(grades, truth)) < 2:
        return float("nan")
    return float(cohen_kappa_score(truth, grades, weights="quadratic"))


def grade_accuracy(predicted: np.ndarray, true: np.ndarray, low: float, high: float) -> float:
    """Share of cases whose prediction, rounded to the grades ``low..high``, is the true grade."""
    return float(np.mean(np.clip(np.rint(predicted), low, high) == np.rint(true)))


def regression_scores(predicted: np.ndarray, true: np.ndarray, targets: TargetNormaliser,
                      prefix: str) -> dict[str, float]:
    """Every metric per target (``<prefix>/<metric>/<column>``) and averaged over the targets
    (``<prefix>/<metric>``), plus ``<prefix>/neg_nmae``: minus the MAE in training standard
    deviations, averaged over targets, which picks the best checkpoint whatever the units.

    Args:
        predicted, true: ``(cases, targets)`` in the targets' units.
    """
    predicted = np.asarray(predicted, dtype=np.float64).reshape(-1, len(targets.columns))
    true = np.asarray(true, dtype=np.float64).reshape(-1, len(targets.columns))
    if not len(true):
        return {}
    out: dict[str, float] = {}
    table = dict(REGRESSION_METRICS)
    for j, column in enumerate(targets.columns):
        if targets.ordinal:
            table["qwk"] = functools.partial(quadratic_weighted_kappa, low=targets.low[j], high=targets.high[j])
            table["acc"] = functools.partial(grade_accuracy, low=targets.low[j], high=targets.high[j])
        for name, metric in table.items():
            out[f"{prefix}/{name}/{column}"] = metric(predicted[:, j], true[:, j])
    for name in table:
        values = [out[f"{prefix}/{name}/{column}"] for column in targets.columns]
        out[f"{prefix}/{name}"] = float(np.mean(values))
    scaled = np.abs(predicted - true) / np.asarray(targets.std)
    out[f"{prefix}/neg_nmae"] = -float(scaled.mean())
    out[f"{prefix}/cases"] = float(len(true))
    return out
