"""Detection QC: which scans a reader should look at before trusting their boxes, and why.

A scan is flagged (``qc_flag``, ``qc_reason`` in ``predictions.csv``; counted per reason in
``qc_summary.json`` and ``predict_summary.json``; first in ``review.html``) when

* it has fewer boxes than ``min_boxes`` (default 1: no box at all: a negative scan, or a miss);
* it has more confident boxes (score 0.5 or more) than ``max_confident_boxes``: twice the most
  lesions any validation scan held (from the evaluate stage's ``val_cases.csv``), else 10;
* its best box scores below ``min_top_score`` (0.5): only low-confidence boxes;
* more than ``max_edge_boxes`` (0) of its confident boxes touch the edge of the image: a lesion
  there may be cut off, or the finding may be an edge artefact.

The model's contract carries the thresholds (``qc``); ``medseg predict --qc KEY=VALUE`` overrides one
for a batch. The reasons read like segmentation's ("confident boxes 14 > 10"), so the review page
and the QC summary count them by kind.
"""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import PredictOptionError

#: A box scoring this much or more counts as confident (``confident_boxes``, the edge check).
CONFIDENT = 0.5
#: The thresholds ``--qc KEY=VALUE`` may set, and what a model starts with.
DEFAULT_QC: dict[str, float] = {"min_boxes": 1.0, "max_confident_boxes": 10.0, "min_top_score": CONFIDENT,
                                "max_edge_boxes": 0.0}
QC_KEYS = tuple(DEFAULT_QC)
#: How far (voxels of the input) from the image's edge a box still touches it.
EDGE_TOLERANCE_VOXELS = 0.5


def contract_qc(val_cases: Path) -> dict[str, float]:
    """The thresholds a model's contract carries: :data:`DEFAULT_QC`, with ``max_confident_boxes``
    twice the most reference boxes of a validation scan when the evaluate stage wrote ``val_cases.csv``."""
    qc = dict(DEFAULT_QC)
    if val_cases.is_file():
        with open(val_cases, newline="") as fh:
            counts = [int(row["reference_boxes"]) for row in csv.DictReader(fh) if row.get("reference_boxes")]
        if counts:
            qc["max_confident_boxes"] = float(max(2 * max(counts), 1))
    return qc


def qc_thresholds(contract: Mapping[str, Any], overrides: Sequence[tuple[str, float]]) -> dict[str, float]:
    """The contract's thresholds (:data:`DEFAULT_QC` for a model packaged before detection had QC)
    with the user's ``--qc`` overrides.

    Raises:
        PredictOptionError: an override names no detection threshold.
    """
    thresholds = {**DEFAULT_QC, **{k: float(v) for k, v in (contract.get("qc") or {}).items() if k in QC_KEYS}}
    for key, value in overrides:
        if key not in QC_KEYS:
            raise PredictOptionError(f"--qc {key}={value}: not a detection QC threshold; use one of "
                                     f"{', '.join(QC_KEYS)}")
        thresholds[key] = float(value)
    return thresholds


def edge_boxes(starts: np.ndarray, ends: np.ndarray, scores: np.ndarray, shape: Sequence[int]) -> int:
    """How many confident boxes (voxel ``starts``/``ends`` of an image of ``shape``) touch its edge."""
    if len(scores) == 0:
        return 0
    size = np.asarray(shape, dtype=np.float64)[: starts.shape[1]]
    touching = (starts <= EDGE_TOLERANCE_VOXELS).any(axis=1) | (ends >= size - EDGE_TOLERANCE_VOXELS).any(axis=1)
    return int((touching & (scores >= CONFIDENT)).sum())


def box_quality(values: Mapping[str, float], thresholds: Mapping[str, float]) -> dict[str, Any]:
    """``qc_flag`` and ``qc_reason`` of one scan from its ``n_boxes``, ``confident_boxes``,
    ``max_score`` and ``edge_boxes`` (an absent or NaN value is not judged)."""
    def known(key: str) -> float | None:
        value = values.get(key)
        return None if value is None or not np.isfinite(value) else float(value)

    reasons = []
    boxes, confident, top, edge = (known(k) for k in ("n_boxes", "confident_boxes", "max_score", "edge_boxes"))
    if boxes is not None and "min_boxes" in thresholds and boxes < thresholds["min_boxes"]:
        reasons.append(f"boxes {boxes:.0f} < {thresholds['min_boxes']:g}")
    if confident is not None and "max_confident_boxes" in thresholds and confident > thresholds["max_confident_boxes"]:
        reasons.append(f"confident boxes {confident:.0f} > {thresholds['max_confident_boxes']:g}")
    if top is not None and "min_top_score" in thresholds and top < thresholds["min_top_score"]:
        reasons.append(f"top score {top:.3f} < {thresholds['min_top_score']:g}")
    if edge is not None and "max_edge_boxes" in thresholds and edge > thresholds["max_edge_boxes"]:
        reasons.append(f"edge boxes {edge:.0f} > {thresholds['max_edge_boxes']:g}")
    return {"qc_flag": bool(reasons), "qc_reason": "; ".join(reasons)}
