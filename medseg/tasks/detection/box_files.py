"""Reference boxes from a CSV or JSON file, one row per box, in world mm or voxel indices.

Every row names its case (``case_id``, or LUNA16's ``seriesuid``) and optionally its ``class``
(an integer, default 1), and gives the box in one of three ways (the columns decide):

==================  =====================================================================  ==========
 kind                columns (2D: the x and y ones only)                                    frame
==================  =====================================================================  ==========
 world corners       ``x_min_mm, y_min_mm, z_min_mm, x_max_mm, y_max_mm, z_max_mm``         ``frame``
 world centre (LUNA) ``coordX, coordY, coordZ, diameter_mm`` (a cube of that edge)          ``frame``
 voxel corners       ``start_0, start_1, start_2, end_0, end_1, end_2`` (end exclusive)    the file's
                                                                                            own grid
==================  =====================================================================  ==========

World coordinates are in the frame ``boxes.frame`` names: ``ras`` (NIfTI, nibabel, medseg's
affines) or ``lps`` (DICOM, ITK, LUNA16's annotations.csv). Voxel indices are those of the image
file as stored, before any reorientation or resampling. A JSON file holds the same rows: a list
of objects, or ``{"boxes": [...]}``.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import ManifestError
from medseg.tasks.detection.boxes import Boxes, check_box_values, check_boxes, voxel_to_world, world_to_voxel

AXES = ("x", "y", "z")
CENTRE_COLUMNS = ("coordX", "coordY", "coordZ")


@dataclass(frozen=True)
class BoxRow:
    """One box of a file: ``values`` as ``(starts..., ends...)``, in world mm (``world``) or in
    the stored image's voxel indices; ``where`` names the file and line for messages."""

    values: tuple[float, ...]
    world: bool
    box_class: int
    where: str


def _columns(dims: int) -> dict[str, list[str]]:
    axes = AXES[:dims]
    return {"world": [f"{a}_min_mm" for a in axes] + [f"{a}_max_mm" for a in axes],
            "centre": [*CENTRE_COLUMNS[:dims], "diameter_mm"],
            "voxel": [f"start_{i}" for i in range(dims)] + [f"end_{i}" for i in range(dims)]}


def _rows(path: Path) -> list[dict[str, Any]]:
    """The file's rows as dicts (CSV or JSON), each with its line (CSV) or index (JSON)."""
    if not path.is_file():
        raise ManifestError(f"{path}: box file not found. Set boxes.file to a CSV or JSON of boxes (see "
                            "docs/how-to/detection.md), or leave it empty to take boxes from the label maps.")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ManifestError(f"{path}: Expected JSON. Got a parse error at line {err.lineno}: {err.msg}.") from None
        rows = data.get("boxes") if isinstance(data, dict) else data
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ManifestError(f"{path}: Expected a list of box objects, or {{\"boxes\": [...]}}. Got "
                                f"{type(rows).__name__}.")
        return [{**row, "_where": f"{path} (box {i})"} for i, row in enumerate(rows)]
    with path.open(newline="") as handle:
        return [{**row, "_where": f"{path}:{i + 2}"} for i, row in enumerate(csv.DictReader(handle))]


def _kind(row: dict[str, Any], dims: int, path: Path) -> str:
    kinds = [kind for kind, names in _columns(dims).items() if all(n in row for n in names)]
    if not kinds:
        choices = "; ".join(f"{k}: {', '.join(v)}" for k, v in _columns(dims).items())
        raise ManifestError(f"{path}: Expected {dims}D box columns, one of: {choices}. Got "
                            f"{sorted(k for k in row if not k.startswith('_'))}.")
    return kinds[0]


def _number(row: dict[str, Any], name: str) -> float:
    try:
        return float(row[name])
    except (TypeError, ValueError):
        raise ManifestError(f"{row['_where']}: Expected a number in {name}. Got {row[name]!r}.") from None


def _box_row(row: dict[str, Any], kind: str, dims: int) -> BoxRow:
    names = _columns(dims)[kind]
    values = [_number(row, n) for n in names]
    if kind == "centre":
        half = values[-1] / 2
        values = [c - half for c in values[:dims]] + [c + half for c in values[:dims]]
    raw_class = row.get("class", 1)
    try:
        box_class = int(raw_class if raw_class not in (None, "") else 1)
    except (TypeError, ValueError):
        raise ManifestError(f"{row['_where']}: Expected an integer class (1, 2, ...). Got {raw_class!r}.") from None
    if box_class < 1:
        raise ManifestError(f"{row['_where']}: Expected a class of 1 or more (0 is background). Got {box_class}.")
    return BoxRow(tuple(values), kind != "voxel", box_class, str(row["_where"]))


def read_box_file(path: str | Path, dims: int) -> dict[str, list[BoxRow]]:
    """Every box of a CSV or JSON box file, by case id.

    Args:
        path: the file.
        dims: 2 or 3, the images' spatial dimensions.

    Raises:
        ManifestError: a missing or empty file, no case column, unknown box columns, or a cell
            that is not a number.
    """
    path = Path(path)
    rows = _rows(path)
    if not rows:
        raise ManifestError(f"{path}: Expected one row per box. Got none (an empty box file). Add the boxes, or "
                            "leave boxes.file empty to take boxes from the label maps.")
    kind = _kind(rows[0], dims, path)
    table: dict[str, list[BoxRow]] = {}
    for row in rows:
        case_id = row.get("case_id") or row.get("seriesuid")
        if not case_id:
            raise ManifestError(f"{row['_where']}: Expected the case in a case_id (or seriesuid) column. Got "
                                f"{row.get('case_id', row.get('seriesuid'))!r}.")
        table.setdefault(str(case_id), []).append(_box_row(row, kind, dims))
    return table


def boxes_on_grid(rows: Sequence[BoxRow], affine: np.ndarray, stored_affine: np.ndarray, shape: Sequence[int],
                  frame: str, source: str) -> Boxes:
    """A case's file boxes as voxel boxes of the grid ``affine`` describes (after preprocessing).

    Args:
        rows: the case's boxes (:func:`read_box_file`).
        affine: voxel -> RAS mm of the grid the boxes go to.
        stored_affine: voxel -> RAS mm of the image as stored (voxel rows refer to it).
        shape: the grid's spatial shape.
        frame: ``ras`` or ``lps``: the frame of world rows.
        source: file and case, for messages.

    Raises:
        ManifestError: a degenerate box, or one outside the image.
    """
    dims = len(shape)
    if not rows:
        return Boxes.empty(dims)
    world = np.array([_in_ras(row, stored_affine, frame, dims) for row in rows])
    corners = check_boxes(world_to_voxel(world, affine), shape, source)
    return Boxes(corners, np.array([row.box_class for row in rows], dtype=np.int64))


def _in_ras(row: BoxRow, stored_affine: np.ndarray, frame: str, dims: int) -> np.ndarray:
    values = np.asarray(row.values, dtype=np.float64)
    check_box_values(values, row.where, "the box")  # degenerate before it is converted
    if not row.world:
        return voxel_to_world(values[None], stored_affine)[0]
    if frame == "lps":  # x and y change sign between LPS and RAS: each one's min and max swap
        flip = np.ones(dims)
        flip[: min(dims, 2)] = -1
        starts, ends = values[:dims] * flip, values[dims:] * flip
        values = np.concatenate([np.minimum(starts, ends), np.maximum(starts, ends)])
    return values
