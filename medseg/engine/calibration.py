"""Temperature scaling: make predicted probabilities mean what they say.

Networks trained with cross-entropy, and more so with Dice losses, are overconfident: of the
voxels or images predicted with probability 0.95, far fewer than 95 % are right (nnU-Net #1032,
#2389). Temperature scaling (Guo et al., 2017) divides every logit by one scalar ``T`` fitted on
the validation split by minimising the negative log-likelihood. The arg-max on the network's
grid, hence accuracy and the evaluated Dice, stays the same, and for two classes the ranking of the
cases (the AUC) too; only the confidence changes (a mask resampled to a scan's own grid may differ
at boundary voxels, where interpolated probabilities are compared). The fitted ``T`` is stored in the model's contract and applied by
predict. The expected calibration error (ECE) says how far confidence and accuracy are apart.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

#: A fitted temperature is kept inside these bounds: outside, the validation split was too small
#: or too easy to say anything (every prediction right and certain drives T towards 0).
TEMPERATURE_RANGE = (0.05, 20.0)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 200) -> float:
    """The temperature minimising the mean cross-entropy of ``softmax(logits / T)``.

    Args:
        logits: (N, K) logits of N voxels or images.
        labels: (N,) integer classes.
        max_iter: L-BFGS iterations (the problem is one-dimensional and convex in log T).

    Returns:
        T; 1.0 when there is nothing to fit: no samples, one class among the logits or the labels,
        or no sample predicted wrong (then the likelihood only rises as T -> 0, and a fitted T would
        make every later mistake look certain).
    """
    if logits.ndim != 2 or logits.shape[0] == 0 or logits.shape[1] < 2:
        return 1.0
    logits, labels = logits.detach().double(), labels.detach().long()
    if labels.unique().numel() < 2 or bool((logits.argmax(1) == labels).all()):
        log.warning("temperature scaling: the %d samples have %s; the temperature stays 1", labels.numel(),
                    "a single class" if labels.unique().numel() < 2 else "no wrong prediction")
        return 1.0
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimiser = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimiser.zero_grad()
        loss = F.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimiser.step(closure)
    value = float(log_t.detach().exp())
    if not math.isfinite(value):
        return 1.0
    low, high = TEMPERATURE_RANGE
    return float(min(max(value, low), high))


def valid_temperature(value: object) -> float | None:
    """``value`` as a temperature medseg applies: a number inside :data:`TEMPERATURE_RANGE`; else None."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    low, high = TEMPERATURE_RANGE
    return number if math.isfinite(number) and low <= number <= high else None


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = 10) -> tuple[float, list[dict]]:
    """ECE of the top-class confidence over equal-width bins, and the per-bin table for the diagram.

    Args:
        probs: (N, K) class probabilities.
        labels: (N,) true classes.
        bins: equal-width confidence bins over [0, 1].
    """
    confidence = probs.max(1)
    correct = probs.argmax(1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    table, ece = [], 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        inside = (confidence > low) & (confidence <= high) if low > 0 else (confidence >= low) & (confidence <= high)
        n = int(inside.sum())
        if n:
            acc, conf = float(correct[inside].mean()), float(confidence[inside].mean())
            ece += n / len(labels) * abs(acc - conf)
        else:
            acc = conf = float("nan")
        table.append({"low": float(low), "high": float(high), "count": n, "accuracy": acc, "confidence": conf})
    return float(ece), table


def negative_log_likelihood(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean cross-entropy of ``softmax(logits / temperature)`` (what the fit minimises)."""
    if logits.shape[0] == 0:
        return float("nan")
    return float(F.cross_entropy(logits.double() / temperature, labels.long()))


def region_of_interest(labels: torch.Tensor, prediction: torch.Tensor, margin: int = 4) -> tuple[slice, ...]:
    """The box around every labelled or predicted structure, grown by ``margin`` voxels.

    Voxel calibration is measured there: far from any structure, every voxel is confidently and
    correctly background, and millions of them would make any network look calibrated.
    The whole volume when neither has foreground.
    """
    found = torch.nonzero((labels != 0) | (prediction != 0))
    if found.numel() == 0:
        return tuple(slice(None) for _ in labels.shape)
    low = (found.min(0).values - margin).clamp(min=0)
    high = found.max(0).values + margin + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


@dataclass
class VoxelSample:
    """Logits and labels of voxels pooled from several cases (what a temperature is fitted on)."""

    logits: list[torch.Tensor]
    labels: list[torch.Tensor]
    limit_per_case: int
    generator: torch.Generator

    @classmethod
    def empty(cls, limit_per_case: int = 100_000, seed: int = 0) -> VoxelSample:
        return cls([], [], limit_per_case, torch.Generator().manual_seed(seed))

    def add_case(self, logits: torch.Tensor, labels: torch.Tensor, prediction: torch.Tensor) -> None:
        """Keep (at most ``limit_per_case`` random) voxels of one case's region of interest.

        Args:
            logits: (K, *spatial) logits.
            labels: (*spatial) true labels.
            prediction: (*spatial) predicted labels (arg-max of ``logits``).
        """
        box = region_of_interest(labels, prediction)
        classes = logits.shape[0]
        case_logits = logits[(slice(None), *box)].reshape(classes, -1).T.float().cpu()
        case_labels = labels[box].reshape(-1).long().cpu()
        if case_labels.numel() > self.limit_per_case:
            keep = torch.randperm(case_labels.numel(), generator=self.generator)[:self.limit_per_case]
            case_logits, case_labels = case_logits[keep], case_labels[keep]
        self.logits.append(case_logits)
        self.labels.append(case_labels)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.logits:
            return torch.zeros(0, 2), torch.zeros(0, dtype=torch.long)
        return torch.cat(self.logits), torch.cat(self.labels)


@dataclass(frozen=True)
class CalibrationReport:
    """A temperature and how calibrated the predictions were before and after it."""

    temperature: float
    samples: int
    nll_before: float
    nll_after: float
    ece_before: float
    ece_after: float
    table_before: Sequence[dict]
    table_after: Sequence[dict]

    def to_json(self) -> dict:
        return {"temperature": self.temperature, "samples": self.samples, "nll_before": self.nll_before,
                "nll_after": self.nll_after, "ece_before": self.ece_before, "ece_after": self.ece_after,
                "reliability_before": list(self.table_before), "reliability_after": list(self.table_after)}


def assess(logits: torch.Tensor, labels: torch.Tensor, temperature: float, bins: int = 10) -> CalibrationReport:
    """ECE and NLL of ``logits`` against ``labels`` without (T = 1) and with ``temperature``."""
    before = torch.softmax(logits.double(), 1).numpy()
    after = torch.softmax(logits.double() / temperature, 1).numpy()
    truth = labels.numpy()
    ece_before, table_before = expected_calibration_error(before, truth, bins)
    ece_after, table_after = expected_calibration_error(after, truth, bins)
    return CalibrationReport(temperature, int(labels.numel()), negative_log_likelihood(logits, labels),
                             negative_log_likelihood(logits, labels, temperature), ece_before, ece_after,
                             table_before, table_after)


def calibrate(logits: torch.Tensor, labels: torch.Tensor, bins: int = 10) -> CalibrationReport:
    """Fit a temperature on ``logits``/``labels`` and report its effect on the same samples."""
    return assess(logits, labels, fit_temperature(logits, labels), bins)


def contract_temperature(contract: dict) -> float:
    """The temperature a model's contract stores (1.0 for models without one, or with a value
    outside :data:`TEMPERATURE_RANGE`, which would turn logits into infinities)."""
    calibration = contract.get("calibration")
    if not isinstance(calibration, dict):
        return 1.0
    return valid_temperature(calibration.get("temperature", 1.0)) or 1.0


#: Where the validation split's evaluation writes the fitted temperature (in the run folder).
CALIBRATION_FILE = Path("evaluation") / "calibration.json"


@dataclass(frozen=True)
class SplitCalibration:
    """What an evaluation learned about calibration: the temperature it used, metrics, figures."""

    temperature: float
    metrics: dict[str, float]
    figures: tuple[Path, ...]


def read_calibration(run_dir: Path) -> dict | None:
    """The run's ``evaluation/calibration.json`` (None before the validation split was evaluated)."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def calibrate_split(enabled: bool, fit: bool, logits: torch.Tensor, labels: torch.Tensor, run_dir: Path,
                    split: str, prefix: str, bins: int = 10, unit: str = "cases") -> SplitCalibration:
    """Calibration of one evaluated split.

    Args:
        enabled: the config's ``validation.calibrate``; False keeps T = 1 (and still reports the ECE).
        fit: fit the temperature on this split (the validation split) and write ``calibration.json``;
            otherwise use the one the run's validation split fitted (the held-out test split).
        logits: (N, K) logits of the split's cases (or sampled voxels) with (N,) ``labels``.
        unit: what the N samples are, for the figures' titles ("cases", "voxels").

    Returns:
        The temperature, metrics ``{prefix}/ece``, ``{prefix}/ece_uncalibrated``, ``{prefix}/nll``,
        ``{prefix}/nll_uncalibrated`` (and ``calibration/temperature`` when fitted), and reliability
        diagrams before and after.
    """
    from medseg.io.atomic import atomic_write_text
    from medseg.plots import reliability_diagram

    stored = read_calibration(run_dir) if enabled and not fit else None
    if enabled and fit:
        temperature = fit_temperature(logits, labels)
    else:
        temperature = valid_temperature((stored or {}).get("temperature", 1.0)) or 1.0
    report = assess(logits, labels, temperature, bins)
    metrics = {f"{prefix}/ece": report.ece_after, f"{prefix}/ece_uncalibrated": report.ece_before,
               f"{prefix}/nll": report.nll_after, f"{prefix}/nll_uncalibrated": report.nll_before}
    if enabled and fit:
        metrics["calibration/temperature"] = temperature
        atomic_write_text(run_dir / CALIBRATION_FILE, json.dumps({"fitted_on": split, **report.to_json()}, indent=2))
    plots = run_dir / "plots"
    where = f"{split}, {report.samples} {unit}"
    # calibration_<split>.png: the probabilities the model gives (with its T); the one before, beside it
    figures = [reliability_diagram(report.table_after, report.ece_after, plots / f"calibration_{split}.png",
                                   f"{where}, T = {temperature:.2f}")]
    if temperature != 1.0:
        figures.append(reliability_diagram(report.table_before, report.ece_before,
                                           plots / f"calibration_{split}_uncalibrated.png", f"{where}, T = 1"))
    return SplitCalibration(temperature, metrics, tuple(figures))


def contract_calibration(run_dir: Path) -> dict:
    """What a packaged model's contract stores: the temperature and where it was fitted ({} without)."""
    stored = read_calibration(run_dir)
    if not stored:
        return {}
    keep = ("temperature", "fitted_on", "samples", "ece_before", "ece_after")
    return {"calibration": {k: stored[k] for k in keep if k in stored}}
