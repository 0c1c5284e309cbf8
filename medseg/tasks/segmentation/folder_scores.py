"""Score a folder of predicted label maps against a folder of references (``medseg evaluate``).

nnU-Net's ``nnUNetv2_evaluate_folder``, with the code that scores medseg's own runs
(:class:`~medseg.tasks.segmentation.metrics.SegmentationMetrics`: Dice from summed tp/fp/fn,
HD95 in mm with a miss counted as the volume's diagonal), so a folder scored here and a run's
test split give the same Dice for the same masks. Cases pair by name (``X.nii.gz`` with
``X.nii.gz``, any registered format on either side). A case that cannot be scored (no
prediction, another grid, unreadable) is a failed row with the reason; the others go on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medseg.data.layouts import dataset_json_names
from medseg.engine.loop import write_csv
from medseg.errors import MedsegError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import InputCase, discover
from medseg.io.geometry import geometry_of
from medseg.io.readers import load_volume
from medseg.tasks.segmentation.metrics import SegmentationMetrics

#: What ``medseg predict`` writes beside each mask: not predictions to pair with a reference.
SIDECAR_SUFFIXES = ("_probabilities", "_entropy", "_variance")
#: Affines of one grid agree to this (mm); NIfTI stores them as float32.
GRID_TOLERANCE_MM = 1e-3
CSV_COLUMNS = ("case_id", "label", "dice", "hd95_mm", "volume_pred_ml", "volume_ref_ml", "volume_error_ml",
               "status", "error", "prediction", "reference")


@dataclass
class FolderScores:
    """Per-case and mean scores of a predictions folder against a references folder.

    Attributes:
        rows: one row per (case, label): Dice, HD95 (mm), volumes (mL) and their difference.
        means: label name -> mean of each score over the scored cases, plus ``dice_mean``.
        dice: the run-style Dice per label (tp/fp/fn summed over all cases, as runs report it).
        failed: case id -> why it was not scored.
        unpaired: predictions with no reference of that name (sidecars not counted).
        files: what was written (``scores.csv``, ``scores.json``) when an output folder was given.
    """

    labels: dict[int, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    dice: dict[str, float] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    unpaired: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    @property
    def scored(self) -> int:
        return len({r["case_id"] for r in self.rows if r["status"] == "ok"})

    def table(self) -> str:
        """The mean table as Markdown: one line per label."""
        lines = ["| label | Dice (summed) | Dice (case mean) | HD95 mm | volume error mL |", "|---|---|---|---|---|"]
        for name in self.labels.values():
            m = self.means.get(name, {})
            lines.append(f"| {name} | {_f(self.dice.get(name))} | {_f(m.get('dice'))} | {_f(m.get('hd95_mm'), 2)} | "
                         f"{_f(m.get('volume_error_ml'), 3)} |")
        return "\n".join(lines)


def score_folders(predictions: Path, references: Path, labels: Mapping[int, str] | None = None,
                  out: Path | None = None) -> FolderScores:
    """Score every reference case that has a prediction of the same name.

    Args:
        predictions: folder of predicted label maps (``medseg predict``'s output folder works as is).
        references: folder of reference label maps (``labelsTr``/``labelsTs``).
        labels: label value -> name (background 0 left out of the scores); None: every non-zero value
            found in the references, named ``label_<value>``.
        out: folder to write ``scores.csv`` (one row per case and label) and ``scores.json``.

    Raises:
        UsageError: a folder does not exist, or holds no label maps.
    """
    pred_cases, ref_cases = _cases(predictions, "predictions"), _cases(references, "references")
    by_id = {c.case_id: c for c in pred_cases}
    named = _labels(labels, ref_cases, references)
    metrics = SegmentationMetrics({0: "background", **named}, hd95=True)
    result = FolderScores(labels=named)
    for ref in ref_cases:
        pred = by_id.get(ref.case_id)
        if pred is None:
            _fail(result, ref.case_id, f"no prediction named {ref.case_id}.* in {predictions}", None, ref)
            continue
        try:
            result.rows.extend(_score_case(metrics, named, pred, ref))
        except (MedsegError, ValueError) as err:
            _fail(result, ref.case_id, str(err), pred, ref)
    paired = {c.case_id for c in ref_cases}
    result.unpaired = [c.case_id for c in pred_cases
                       if c.case_id not in paired and not c.case_id.endswith(SIDECAR_SUFFIXES)]
    _summarise(result, metrics)
    if out is not None:
        _write(result, Path(out))
    return result


def _cases(folder: Path, what: str) -> list[InputCase]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{what} folder {folder}: not found. Expected a folder of label maps "
                         f"(NIfTI, NRRD, MHA, ...). Check the path.")
    cases = [c for c in discover(folder, channels=1).cases if c.kind == "file"]
    if not cases:
        raise UsageError(f"{what} folder {folder}: no label maps found (expected .nii.gz, .nrrd, .mha, ... files).")
    return cases


def _labels(labels: Mapping[int, str] | None, refs: list[InputCase], references: Path) -> dict[int, str]:
    """The labels to score: those given, else every non-zero value in the references, named as the
    dataset.json beside the references folder names them (nnU-Net's and MSD's ``labelsTs/``)."""
    if labels:
        return {int(v): str(n) for v, n in sorted(labels.items()) if int(v) != 0}
    values: set[int] = set()
    for case in refs:
        try:
            values.update(int(v) for v in np.unique(np.asarray(load_volume(case.path))) if v != 0)
        except MedsegError:
            continue  # reported as a failed case when it is scored
    if not values:
        raise UsageError("the references hold no foreground label; pass --labels 1=name,2=name to say what to score")
    try:
        named = dataset_json_names(references.resolve().parent)[1] or {}
    except MedsegError:
        named = {}  # a malformed dataset.json only costs the names
    return {v: named.get(v) or f"label_{v}" for v in sorted(values)}


def _score_case(metrics: SegmentationMetrics, labels: dict[int, str], pred_case: InputCase,
                ref_case: InputCase) -> list[dict[str, Any]]:
    pred, ref = load_volume(pred_case.path), load_volume(ref_case.path)
    _same_grid(pred, ref, pred_case.path, ref_case.path)
    geometry = geometry_of(ref)
    spacing = tuple(float(s) for s in geometry.spacing)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    pred_map, ref_map = _label_map(pred, pred_case.path, labels), _label_map(ref, ref_case.path, labels)
    before = len(metrics.per_case)
    metrics.update(pred_map, ref_map, spacing, case_id=ref_case.case_id)
    case_row = metrics.per_case[before]
    rows = []
    for value, name in labels.items():
        pred_ml = float((pred_map == value).sum()) * voxel_ml
        ref_ml = float((ref_map == value).sum()) * voxel_ml
        rows.append({"case_id": ref_case.case_id, "label": name, "dice": case_row.get(f"dice/{name}"),
                     "hd95_mm": case_row.get(f"hd95/{name}"), "volume_pred_ml": pred_ml, "volume_ref_ml": ref_ml,
                     "volume_error_ml": pred_ml - ref_ml, "status": "ok", "error": "",
                     "prediction": str(pred_case.path), "reference": str(ref_case.path)})
    return rows


def _same_grid(pred: Any, ref: Any, pred_path: Path, ref_path: Path) -> None:
    if tuple(pred.shape) != tuple(ref.shape):
        raise ValueError(f"{pred_path}: expected the grid of its reference {ref_path} (shape {tuple(ref.shape[1:])}), "
                         f"got shape {tuple(pred.shape[1:])}. Predict on the reference's own grid "
                         "(`medseg predict` writes every mask on its input's grid) or resample the prediction first.")
    a, b = np.asarray(pred.affine, dtype=np.float64), np.asarray(ref.affine, dtype=np.float64)
    if not np.allclose(a, b, atol=GRID_TOLERANCE_MM):
        raise ValueError(f"{pred_path}: expected the affine of its reference {ref_path}, got another one "
                         f"(largest difference {float(np.abs(a - b).max()):.4g} mm): same shape, other spacing, "
                         "origin or orientation. Predict on the reference's own grid or resample the prediction.")


def _label_map(volume: Any, path: Path, labels: dict[int, str]) -> torch.Tensor:
    array = np.asarray(volume)[0]
    rounded = np.rint(array)
    if not np.allclose(array, rounded):
        raise ValueError(f"{path}: expected a label map of integers, got fractional values "
                         f"(e.g. {float(array[array != rounded][0]):.4g}); is it a probability map?")
    unknown = sorted(set(np.unique(rounded).astype(int).tolist()) - set(labels) - {0})
    if unknown:
        raise ValueError(f"{path}: label values {unknown} are not among the scored labels {sorted(labels)}; "
                         "pass --labels with every value, or check that the right folder was given.")
    return torch.from_numpy(rounded.astype(np.int64))


def _fail(result: FolderScores, case_id: str, why: str, pred: InputCase | None, ref: InputCase) -> None:
    result.failed[case_id] = why
    result.rows.append({"case_id": case_id, "label": "", "status": "failed", "error": why,
                        "prediction": str(pred.path) if pred else "", "reference": str(ref.path)})


def _summarise(result: FolderScores, metrics: SegmentationMetrics) -> None:
    ok = [r for r in result.rows if r["status"] == "ok"]
    for name in result.labels.values():
        mine = [r for r in ok if r["label"] == name]
        result.means[name] = {key: _nanmean([r[key] for r in mine])
                              for key in ("dice", "hd95_mm", "volume_error_ml", "volume_pred_ml", "volume_ref_ml")}
    if ok:
        aggregated = metrics.aggregate("folder")
        result.dice = {name: aggregated[f"folder/dice/{name}"] for name in result.labels.values()}
        result.dice["dice_mean"] = aggregated["folder/dice_mean"]


def _nanmean(values: list[Any]) -> float:
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(finite)) if finite else float("nan")


def _write(result: FolderScores, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_csv(out / "scores.csv", CSV_COLUMNS, result.rows)
    summary = {"labels": {str(v): n for v, n in result.labels.items()}, "cases_scored": result.scored,
               "dice_summed": result.dice, "means": result.means, "failed": result.failed,
               "unpaired_predictions": result.unpaired, "per_case": result.rows}
    json_path = out / "scores.json"
    atomic_write_text(json_path, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    result.files = {"csv": str(csv_path), "json": str(json_path)}


def json_safe(value: Any) -> Any:
    """NaN and infinity (a score with nothing to score, e.g. HD95 of an absent structure; the PSNR of
    a reference against itself) as JSON null, through dicts and lists."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"
