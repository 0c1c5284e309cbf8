"""Regression targets: one or several continuous values per case, read from a CSV by case id.

The CSV is either the manifest itself (its ``target`` / ``target_<name>`` columns, which
:func:`~medseg.data.manifest.read_manifest` accepts) or a file of its own with a ``case_id``
column. :func:`write_structure_volumes` measures such a file from label maps: each structure's
volume in mL (voxel count x voxel volume from the header), what a regression task can then learn
to read off the image alone.
"""

from __future__ import annotations

import csv
import difflib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.manifest import TARGET_PREFIX, Manifest
from medseg.errors import ManifestError
from medseg.io.atomic import atomic_write_text
from medseg.io.csv_cells import csv_text, unescape_cell

__all__ = ["TARGET_PREFIX", "TargetTable", "read_targets", "structure_volumes_ml", "write_structure_volumes"]


@dataclass(frozen=True)
class TargetTable:
    """The targets of every case a CSV lists.

    Attributes:
        source: the CSV they were read from.
        columns: the target columns, in the config's order.
        values: case id -> one value per column.
    """

    source: Path
    columns: tuple[str, ...]
    values: Mapping[str, tuple[float, ...]]

    def array(self, case_ids: Sequence[str]) -> np.ndarray:
        """``(len(case_ids), len(columns))`` float64 targets of those cases.

        Raises:
            ManifestError: a case the CSV does not list (Expected / Got / File, and the fix).
        """
        missing = [c for c in case_ids if c not in self.values]
        if missing:
            raise ManifestError(_message(
                f"{len(missing)} case(s) have no targets", self.source,
                expected=f"a row for every case of the manifest's splits, with columns {list(self.columns)}",
                got=f"no row for {_few(missing)}",
                fix="add their rows (or remove the cases from the manifest)"))
        return np.array([self.values[c] for c in case_ids], dtype=np.float64).reshape(len(case_ids), len(self.columns))


def read_targets(path: str | Path, columns: Sequence[str]) -> TargetTable:
    """Read the ``columns`` of every row of a CSV with a ``case_id`` column.

    Raises:
        ManifestError: a missing file or column, a repeated case, or a cell that is empty, not a
            number, NaN or infinite; each names the file, line, case and column, what was expected,
            what was found and how to fix it.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(_message("the targets file does not exist", path, expected="a CSV with a case_id column "
                                     f"and the target column(s) {list(columns)}", got="no such file",
                                     fix="set data.targets.file, or write volumes with medseg.write_structure_volumes"))
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        _check_header(path, reader.fieldnames or [], columns)
        values: dict[str, tuple[float, ...]] = {}
        for line, row in enumerate(reader, start=2):
            case_id = unescape_cell((row.get("case_id") or "").strip())
            if case_id in values:
                raise ManifestError(_message(f"line {line}: case {case_id!r} is listed twice", path,
                                             expected="one row per case", got="a second row", fix="remove one row"))
            values[case_id] = tuple(_number(path, line, case_id, column, row.get(column)) for column in columns)
    return TargetTable(path, tuple(columns), values)


def _check_header(path: Path, header: Sequence[str], columns: Sequence[str]) -> None:
    if "case_id" not in header:
        raise ManifestError(_message("no case_id column", path, expected="a header with case_id and "
                                     f"{list(columns)}", got=f"header {list(header)}", fix="add the case_id column"))
    for column in columns:
        if column not in header:
            close = difflib.get_close_matches(column, header, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ManifestError(_message(f"no target column {column!r}", path, expected=f"a column {column!r}",
                                         got=f"header {list(header)}",
                                         fix=f"{hint}set data.targets.columns to columns of this file"))


def _number(path: Path, line: int, case_id: str, column: str, text: str | None) -> float:
    """One target cell as a finite float."""
    where = f"line {line}, case {case_id!r}, column {column!r}"
    cell = (text or "").strip()
    if not cell:
        raise ManifestError(_message(f"{where}: the target is missing", path, expected="a finite number",
                                     got="an empty cell", fix="fill it in, or remove the case from the manifest"))
    try:
        value = float(cell)
    except ValueError:
        raise ManifestError(_message(f"{where}: the target is not a number", path, expected="a finite number "
                                     "(a dot for decimals, no units)", got=repr(cell),
                                     fix="write the number alone, e.g. 3.25")) from None
    if not math.isfinite(value):
        raise ManifestError(_message(f"{where}: the target is not finite", path, expected="a finite number",
                                     got=repr(cell), fix="measure the case again, or remove it from the manifest"))
    return value


def _message(what: str, path: Path, *, expected: str, got: str, fix: str) -> str:
    return f"targets: {what}.\n    Expected: {expected}\n    Got:      {got}\n    File:     {path}\n    Fix:      {fix}"


def _few(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(repr(n) for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ----------------------------------------------------------------------------------- structure volumes


def structure_volumes_ml(label_path: str | Path, labels: Mapping[int, str]) -> dict[str, float]:
    """Each labelled structure's volume in mL: its voxel count times the voxel volume the header gives.

    Args:
        label_path: a label map (any format medseg reads).
        labels: label value -> structure name (background 0 is not measured unless listed).

    Returns:
        structure name -> volume in mL (0.0 for a structure the map does not contain).
    """
    from medseg.io.readers import load_volume

    volume = load_volume(label_path)
    array = np.rint(volume.numpy())  # a label map stored as floats counts as its nearest integers
    voxel_ml = abs(float(np.linalg.det(volume.affine.numpy().astype(np.float64)[:3, :3]))) / 1000.0
    return {name: float(np.count_nonzero(array == value)) * voxel_ml for value, name in labels.items()}


def write_structure_volumes(manifest: Manifest, root: str | Path, labels: Mapping[int, str],
                            out: str | Path) -> Path:
    """Write ``case_id, <name>_ml...``: the structure volumes of every labelled case of ``manifest``.

    Args:
        manifest: cases whose ``label`` is a label map (relative to ``root``).
        root: the data root.
        labels: label value -> structure name; each becomes a column ``<name>_ml``.
        out: the CSV to write (atomically).

    Raises:
        ManifestError: no case has a label map.
    """
    cases = [c for c in manifest.cases if c.label]
    if not cases:
        raise ManifestError(f"{manifest.path}: no case has a label map to measure volumes from")
    columns = [f"{name}_ml" for name in labels.values()]
    rows = []
    for case in cases:
        volumes = structure_volumes_ml(Path(root) / str(case.label), labels)
        rows.append({"case_id": case.case_id, **{f"{name}_ml": f"{volumes[name]:.6f}" for name in labels.values()}})
    return atomic_write_text(out, csv_text(rows, ["case_id", *columns]))
