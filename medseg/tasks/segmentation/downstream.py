"""Judging enhanced images by what they do downstream (``medseg evaluate-downstream``).

An image-to-image output (super-resolved, reconstructed, denoised) and its naive baselines
(trilinear, B-spline, zero-filled) are segmented by a frozen segmentation model; each kind of
input gets the Dice of its masks against the reference labels, scored by the code that scores
``medseg evaluate`` and a run's test split (:func:`~medseg.tasks.segmentation.folder_scores.score_folders`),
beside its PSNR and SSIM against the reference image (MONAI's metrics, the reference's own
intensity range as the data range).

The pairs table (CSV, one row per case and kind of input; paths relative to the table's folder)::

    case_id,kind,image,reference,label
    hippocampus_003,sr,sr/hippocampus_003.nii.gz,original/hippocampus_003.nii.gz,labels/hippocampus_003.nii.gz
    hippocampus_003,trilinear,trilinear/hippocampus_003.nii.gz,original/hippocampus_003.nii.gz,labels/...

A row whose image is its reference (the original) scores the segmenter's own ceiling.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from medseg.engine.loop import write_csv
from medseg.errors import MedsegError, UsageError
from medseg.io.atomic import atomic_write_text
from medseg.io.readers import load_volume, strip_volume_suffix
from medseg.tasks.segmentation.folder_scores import GRID_TOLERANCE_MM, json_safe, score_folders

PAIR_COLUMNS = ("case_id", "kind", "image", "reference", "label")
#: SSIM's Gaussian window (voxels per side): small enough for cropped volumes of ~30 voxels
SSIM_WINDOW = 7
#: case ids and kinds name files and folders
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ImagePair:
    """One input to judge: ``image`` (of ``kind``) against ``reference``, segmented against ``label``."""

    case_id: str
    kind: str
    image: Path
    reference: Path
    label: Path


@dataclass
class DownstreamScores:
    """Per case and kind: Dice per label and their mean, PSNR and SSIM; and the means per kind.

    Attributes:
        labels: label value -> name (background left out).
        rows: one row per (case, kind).
        means: kind -> ``dice_mean``, ``dice/<label>``, ``psnr``, ``ssim`` (means over its scored cases)
            and ``cases``.
        files: what was written (``downstream.csv``, ``downstream.json``).
        run_id: the MLflow run they were logged to (None: not logged).
    """

    labels: dict[int, str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    means: dict[str, dict[str, float]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None

    def metrics(self, prefix: str = "downstream") -> dict[str, float]:
        """The means as metric names ``<prefix>/<kind>/dice_mean``..., finite values only (for MLflow)."""
        return {f"{prefix}/{kind}/{key}": value for kind, means in self.means.items() for key, value in means.items()
                if math.isfinite(value)}

    def table(self) -> str:
        """The means as Markdown: one line per kind."""
        names = list(self.labels.values())
        lines = ["| input | cases | Dice mean | " + " | ".join(f"Dice {n}" for n in names) + " | PSNR dB | SSIM |",
                 "|---" * (5 + len(names)) + "|"]
        for kind, m in self.means.items():
            dice = " | ".join(_f(m.get(f"dice/{n}")) for n in names)
            lines.append(f"| {kind} | {int(m['cases'])} | {_f(m.get('dice_mean'))} | {dice} | "
                         f"{_f(m.get('psnr'), 2)} | {_f(m.get('ssim'))} |")
        return "\n".join(lines)


def read_pairs(path: Path) -> list[ImagePair]:
    """The pairs table at ``path`` (see the module docstring).

    Raises:
        UsageError: the file is missing, lacks a column, has an empty cell, an unsafe name, a
            repeated (case, kind) or a path that does not exist; the message says where and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--pairs {path}: file not found. Expected a CSV with columns {', '.join(PAIR_COLUMNS)}")
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in PAIR_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise UsageError(f"{path}: expected columns {list(PAIR_COLUMNS)}; got {reader.fieldnames}. "
                             f"Add {missing}")
        pairs = [_pair(row, path, line) for line, row in enumerate(reader, start=2)]
    if not pairs:
        raise UsageError(f"{path}: expected at least one row of pairs; got only the header")
    seen: set[tuple[str, str]] = set()
    for pair in pairs:
        if (pair.case_id, pair.kind) in seen:
            raise UsageError(f"{path}: case {pair.case_id!r} has two rows of kind {pair.kind!r}; keep one")
        seen.add((pair.case_id, pair.kind))
    return pairs


def _pair(row: Mapping[str, str | None], table: Path, line: int) -> ImagePair:
    values = {c: (row.get(c) or "").strip() for c in PAIR_COLUMNS}
    for column in ("case_id", "kind"):
        if not SAFE_NAME.match(values[column]):
            raise UsageError(f"{table}, line {line}: {column} {values[column]!r}: expected letters, digits, '.', '_' "
                             "or '-' (it names files and folders); got something else")
    paths: dict[str, Path] = {}
    for column in ("image", "reference", "label"):
        if not values[column]:
            raise UsageError(f"{table}, line {line}: the {column} cell is empty; give a path (relative to {table.parent})")
        found = Path(values[column]) if Path(values[column]).is_absolute() else table.parent / values[column]
        if not found.exists():
            raise UsageError(f"{table}, line {line}: {column} {found}: not found. Paths are relative to the table's "
                             f"folder {table.parent}")
        paths[column] = found
    return ImagePair(values["case_id"], values["kind"], paths["image"], paths["reference"], paths["label"])


def kinds(pairs: Sequence[ImagePair]) -> list[str]:
    """The kinds of input, in the table's order."""
    return list(dict.fromkeys(p.kind for p in pairs))


def stage_by_case(files: Mapping[str, Path], folder: Path) -> Path:
    """``folder`` holding each file as ``<case id><its suffix>`` (a link, a copy where links are refused),
    so that folder tools pair them by case."""
    folder.mkdir(parents=True, exist_ok=True)
    for case_id, source in files.items():
        suffix = source.name[len(strip_volume_suffix(source.name)):]
        target = folder / f"{case_id}{suffix}"
        if target.is_symlink() or target.exists():
            target.unlink()
        try:
            os.symlink(source.resolve(), target)
        except OSError:
            shutil.copyfile(source, target)
    return folder


def score_downstream(pairs: Sequence[ImagePair], masks: Mapping[str, Path], labels: Mapping[int, str],
                     work: Path, out: Path | None = None) -> DownstreamScores:
    """Score each kind's masks (``masks[kind]``: a folder of ``<case id>.nii.gz``) against the labels,
    and each image against its reference.

    Args:
        pairs: the table's rows.
        masks: kind -> the folder the frozen segmenter wrote that kind's masks into.
        labels: value -> name of the labels to score (background left out).
        work: a folder for the labels staged by case id and each kind's folder scores.
        out: write ``downstream.csv`` and ``downstream.json`` here.
    """
    named = {int(v): str(n) for v, n in labels.items() if int(v) != 0}
    result = DownstreamScores(labels=named)
    for kind in kinds(pairs):
        mine = [p for p in pairs if p.kind == kind]
        references = stage_by_case({p.case_id: p.label for p in mine}, work / "labels" / kind)
        folder = score_folders(masks[kind], references, named, work / "scores" / kind)
        for pair in mine:
            result.rows.append(_row(pair, folder.rows, named))
        result.means[kind] = _means([r for r in result.rows if r["kind"] == kind and r["status"] == "ok"], named)
    if out is not None:
        _write(result, Path(out))
    return result


def _row(pair: ImagePair, folder_rows: Sequence[dict[str, Any]], labels: Mapping[int, str]) -> dict[str, Any]:
    row: dict[str, Any] = {"case_id": pair.case_id, "kind": pair.kind, "status": "ok", "error": "",
                           "image": str(pair.image), "reference": str(pair.reference)}
    scored = {r["label"]: r for r in folder_rows if r["case_id"] == pair.case_id}
    failed = [r for r in scored.values() if r["status"] != "ok"]
    if failed or not scored:
        return {**row, "status": "failed", "error": failed[0]["error"] if failed else "no mask was scored"}
    dice = [_number(scored[name]["dice"]) for name in labels.values()]
    row.update({f"dice/{name}": value for name, value in zip(labels.values(), dice)})
    row["dice_mean"] = _nanmean(dice)
    try:
        row.update(image_quality(pair.image, pair.reference))
    except (MedsegError, ValueError) as err:
        row.update(status="failed", error=str(err))
    return row


def image_quality(image_path: Path, reference_path: Path) -> dict[str, float]:
    """PSNR (dB) and SSIM of an image against its reference on the same grid, MONAI's metrics with
    the reference's intensity range as the data range (PSNR is infinite for the reference itself).

    Raises:
        ValueError: the two are not on one grid (names both, and the fix).
    """
    image, reference = load_volume(image_path), load_volume(reference_path)
    if tuple(image.shape) != tuple(reference.shape) or not np.allclose(
            np.asarray(image.affine), np.asarray(reference.affine), atol=GRID_TOLERANCE_MM):
        raise ValueError(f"{image_path}: expected the grid of its reference {reference_path} (shape "
                         f"{tuple(reference.shape[1:])}), got shape {tuple(image.shape[1:])} or another affine. "
                         "Write the enhanced image and its baselines on the reference's grid")
    x = torch.as_tensor(np.asarray(image), dtype=torch.float64)[None]
    y = torch.as_tensor(np.asarray(reference), dtype=torch.float64)[None]
    data_range = float(y.max() - y.min()) or 1.0
    psnr = float(torch.as_tensor(PSNRMetric(max_val=data_range)(x, y)).mean())
    ssim = float(torch.as_tensor(SSIMMetric(spatial_dims=3, data_range=data_range, win_size=SSIM_WINDOW)(x, y)).mean())
    return {"psnr": psnr, "ssim": ssim}


def _means(rows: Sequence[dict[str, Any]], labels: Mapping[int, str]) -> dict[str, float]:
    keys = ["dice_mean", *(f"dice/{n}" for n in labels.values()), "psnr", "ssim"]
    means = {key: _nanmean([r.get(key) for r in rows]) for key in keys}
    means["cases"] = float(len(rows))
    return means


def _number(value: Any) -> float:
    return float("nan") if value is None or value == "" else float(value)


def _nanmean(values: Sequence[Any]) -> float:
    """The mean of the values that are not NaN (an infinite PSNR, the reference itself, stays infinite)."""
    kept = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return float(np.mean(kept)) if kept else float("nan")


def _write(result: DownstreamScores, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    columns = ["case_id", "kind", "dice_mean", *(f"dice/{n}" for n in result.labels.values()), "psnr", "ssim",
               "status", "error", "image", "reference"]
    csv_path = write_csv(out / "downstream.csv", columns, result.rows)
    summary = {"labels": {str(v): n for v, n in result.labels.items()}, "means": result.means,
               "per_case": result.rows}
    json_path = out / "downstream.json"
    atomic_write_text(json_path, json.dumps(json_safe(summary), indent=2, allow_nan=False) + "\n")
    result.files = {"csv": str(csv_path), "json": str(json_path)}


def _f(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


__all__ = ["DownstreamScores", "ImagePair", "image_quality", "kinds", "read_pairs", "score_downstream",
           "stage_by_case"]
