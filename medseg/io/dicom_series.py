"""DICOM series folders read as one volume, after checking that the slices make one regular grid.

SimpleITK/GDCM sorts a series by slice position (never by file name) and keeps oblique
direction cosines (:class:`~medseg.io.sitk_reader.SimpleITKReader` turns the result into RAS).

SimpleITK assumes a series is a regular grid: it takes orientation and pixel spacing from the first
slice and the slice step from the end positions, and it only warns (on stderr) about gaps. So
before reading, :func:`read_dicom_series` checks the slice headers itself and refuses, naming the
files, a series with slices missing, uneven steps, conflicting slices at one position, or slices of
another size, orientation or pixel spacing (see :func:`read_dicom_series` for the rules).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom

from medseg.errors import VolumeReadError
from medseg.io.dicom_sniff import is_dicom_file
from medseg.io.preflight import check_header

if TYPE_CHECKING:
    import SimpleITK as sitk

log = logging.getLogger(__name__)

# DICOM tags carried into the metadata (scalars only, so batches still collate).
DICOM_TAGS = {
    "0008|0060": "modality",
    "0020|000e": "series_instance_uid",
    "0008|103e": "series_description",
    "0020|000d": "study_instance_uid",
}

# Header fields the series checks read (pixel data is not read, except for duplicate slices).
_GEOMETRY_TAGS = [
    "SeriesInstanceUID", "Rows", "Columns", "NumberOfFrames", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "InstanceNumber",
]
#: Direction-cosine components closer than this are one orientation (about 0.06 degrees).
ORIENTATION_ATOL = 1e-3
#: Pixel spacings within this relative tolerance are one spacing.
SPACING_RTOL = 1e-3
#: Slices closer than this (mm, along the slice normal) sit at one position: duplicates.
SAME_POSITION_MM = 1e-3
#: A step between neighbouring slices over this many median steps means slices are missing.
GAP_FACTOR = 1.5
#: Every other step must be within this fraction of the median step.
UNEVEN_RTOL = 0.1
#: How many file names a message lists per group before "and N more".
_NAMES_SHOWN = 3


def read_dicom_series(folder: Path) -> sitk.Image:
    """Read the one DICOM image series in ``folder``, slices sorted by position.

    Before SimpleITK reads the pixels, the slice headers are checked (pydicom, no pixel data):

    * every slice has the same Rows x Columns, ImageOrientationPatient and PixelSpacing;
    * no slice of a multi-slice series is a multi-frame file;
    * slices at one ImagePositionPatient are *identical duplicates* (same position and same pixel
      values, e.g. a file copied twice under two names): the first by file name is read, the others
      are skipped with a logged warning. Slices at one position holding different pixels conflict;
    * along the slice normal, no step between neighbours exceeds ``GAP_FACTOR`` (1.5) times the
      median step (slices missing), and every step is within ``UNEVEN_RTOL`` (10 %) of the median.
      Slices missing at either *end* of a series cannot be told from a shorter scan;
    * no file of the series is left out: the DICOM scanner (GDCM) silently skips hidden files (name
      starts with ``.``; medseg's discovery skips them too) and files it cannot parse (truncated or
      damaged). Such a file that holds this SeriesInstanceUID, or whose header pydicom cannot read
      either, is refused by name; other DICOM files (another series, a DICOMDIR) are ignored.

    A one-slice series reads as a volume with one slice (z spacing 1, SimpleITK's default);
    whether a model can take it is for the caller to decide. Header values (SeriesDescription,
    PatientID, ...) go into the metadata as they are and are never used to build a path.

    Raises:
        VolumeReadError: the folder holds no DICOM image series, or several (they are listed), or
            the series fails one of the checks above (the message names the files and values).
    """
    import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs
    reader = sitk.ImageSeriesReader()
    series_ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not series_ids:
        hidden, unparsed = _left_out_dicom_files(folder, [])
        hint = ""
        if hidden:
            hint += (
                f" {len(hidden)} hidden file(s) hold DICOM data ({_names(hidden)}) but names starting with '.' "
                "are skipped; rename them without the leading dot."
            )
        if unparsed:
            hint += (
                f" {len(unparsed)} file(s) start like DICOM but the DICOM reader cannot use them ({_names(unparsed)}); "
                "they are probably truncated or damaged: copy or export them again."
            )
        raise VolumeReadError(
            f"{folder}: no DICOM image series found in this folder (files are not read recursively).{hint} "
            "Point at the folder that directly holds the .dcm slices."
        )
    if len(series_ids) > 1:
        listing = "; ".join(_describe_series(folder, uid) for uid in series_ids)
        raise VolumeReadError(
            f"{folder}: holds {len(series_ids)} DICOM series, expected one: {listing}. "
            "Move each series into its own folder (one folder per SeriesInstanceUID)."
        )
    found = [Path(name) for name in reader.GetGDCMSeriesFileNames(str(folder), series_ids[0])]
    headers = [_slice_header(path) for path in found]
    _refuse_left_out(folder, found, {h.series_uid for h in headers})
    files, step = _checked_slice_order(folder, headers)
    if len(files) > 1 and headers[0].size is not None and headers[0].size[0] == 1:
        image = _stack_one_row_slices(files, step)
    else:
        reader.SetFileNames([str(path) for path in files])
        reader.MetaDataDictionaryArrayUpdateOn()
        try:
            image = reader.Execute()
        except RuntimeError as err:
            raise VolumeReadError(
                f"{folder}: the headers of this series check out but SimpleITK cannot decode its pixel data "
                f"({_last_line(err)}). A slice is damaged or uses a compression (transfer syntax) this SimpleITK "
                "build lacks: re-export the series uncompressed, or replace the damaged slice."
            ) from err
        for tag, key in DICOM_TAGS.items():
            if reader.HasMetaDataKey(0, tag):
                image.SetMetaData(key, reader.GetMetaData(0, tag).strip())
    image.SetMetaData("dicom_num_files", str(len(files)))
    return image


def _stack_one_row_slices(files: list[Path], step: float | None) -> sitk.Image:
    """Slices one row high, stacked along the slice normal.

    ``ImageSeriesReader`` takes a slice of size (columns, 1, 1) for a 1D image and stacks the
    slices along y instead, with the step as y spacing; so these are read one by one.
    """
    import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs
    image = sitk.GetImageFromArray(np.concatenate([_pixels(path) for path in files], axis=0))
    first = sitk.ImageFileReader()
    first.SetFileName(str(files[0]))
    first.ReadImageInformation()
    image.SetOrigin(first.GetOrigin())
    image.SetDirection(first.GetDirection())
    image.SetSpacing((*first.GetSpacing()[:2], step if step is not None else first.GetSpacing()[2]))
    for tag, key in DICOM_TAGS.items():
        if first.HasMetaDataKey(tag):
            image.SetMetaData(key, first.GetMetaData(tag).strip())
    return image


@dataclass(frozen=True)
class _SliceHeader:
    """The header fields of one slice file that the series checks compare."""

    path: Path
    series_uid: str
    size: tuple[int, int] | None  # (Rows, Columns)
    frames: int
    position: np.ndarray | None  # ImagePositionPatient (LPS, mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (row cosines, column cosines)
    spacing: tuple[float, float] | None  # PixelSpacing (between rows, between columns; mm)
    instance: str


def _slice_header(path: Path) -> _SliceHeader:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=_GEOMETRY_TAGS)
    except Exception as err:  # pydicom raises many types on a damaged file
        raise VolumeReadError(
            f"{path}: the DICOM header is damaged or truncated ({type(err).__name__}: {err}). "
            "Replace the file from the original export, or remove it and re-export the series."
        ) from err
    rows, columns = ds.get("Rows"), ds.get("Columns")
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        frames = 1
    position = _header_floats(ds, path, "ImagePositionPatient", 3)
    return _SliceHeader(
        path=path,
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        size=(int(rows), int(columns)) if rows is not None and columns is not None else None,
        frames=frames,
        position=None if position is None else np.asarray(position),
        orientation=_header_floats(ds, path, "ImageOrientationPatient", 6),
        spacing=_pair(_header_floats(ds, path, "PixelSpacing", 2)),
        instance=str(ds.get("InstanceNumber", "")),
    )


def _pair(values: tuple[float, ...] | None) -> tuple[float, float] | None:
    return None if values is None else (values[0], values[1])


def _header_floats(ds: pydicom.Dataset, path: Path, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` numbers from a header field; None if the field is absent or empty."""
    try:
        raw = ds.get(keyword)
        if raw is None or raw == "":
            return None
        values = tuple(float(v) for v in (raw if isinstance(raw, Sequence) and not isinstance(raw, str) else [raw]))
        if not values:
            return None
    except (TypeError, ValueError) as err:
        raise VolumeReadError(
            f"{path}: {keyword} is not a list of numbers ({err}). "
            "The header is malformed; re-export the series from the scanner or PACS."
        ) from err
    if len(values) != count or not all(np.isfinite(values)):
        raise VolumeReadError(
            f"{path}: {keyword} holds {list(values)}, expected {count} finite numbers. "
            "The header is malformed; re-export the series from the scanner or PACS."
        )
    return values


def _left_out_dicom_files(folder: Path, listed: Sequence[Path]) -> tuple[list[Path], list[Path]]:
    """Files in ``folder`` with the DICOM magic that the GDCM scan did not list: (hidden, others)."""
    names = {path.name for path in listed}
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return [], []
    left_out = [p for p in entries if p.name not in names and p.is_file() and is_dicom_file(p)]
    return [p for p in left_out if p.name.startswith(".")], [p for p in left_out if not p.name.startswith(".")]


def _may_belong(path: Path, series_uids: set[str]) -> bool:
    """True if ``path`` holds one of ``series_uids``, or its header is unreadable (so it may)."""
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"])
    except Exception:  # a damaged file (an unfinished transfer, say) may well be one of ours
        return True
    uid = str(header.get("SeriesInstanceUID", ""))
    log.debug("%s: DICOM file outside the series (SeriesInstanceUID %r) skipped", path, uid)
    return uid in series_uids


def _refuse_left_out(folder: Path, found: Sequence[Path], series_uids: set[str]) -> None:
    """A file of the series that the GDCM scan skipped would be silently missing: refuse instead."""
    hidden, unparsed = _left_out_dicom_files(folder, found)
    hidden = [p for p in hidden if _may_belong(p, series_uids)]
    if hidden:
        raise VolumeReadError(
            f"{folder}: {len(hidden)} hidden file(s) hold DICOM data of this series ({_names(hidden)}), but files "
            "whose name starts with '.' are skipped, so those slices would be left out. Rename them without the "
            "leading dot, or delete them if they are stray copies or unfinished transfers."
        )
    unparsed = [p for p in unparsed if _may_belong(p, series_uids)]
    if unparsed:
        raise VolumeReadError(
            f"{folder}: {len(unparsed)} file(s) of this series cannot be parsed by the DICOM reader and would be "
            f"left out ({_names(unparsed)}); they are probably truncated or damaged (an interrupted copy or "
            "download). Copy them again from the original export, or re-export the series."
        )


def _checked_slice_order(folder: Path, headers: list[_SliceHeader]) -> tuple[list[Path], float | None]:
    """The slice files to read, sorted along the slice normal, after the checks of read_dicom_series,
    and the mean step between them along the normal (None when the headers give no positions)."""
    if len(headers) < 2:
        return [h.path for h in headers], None
    fix = (
        "Move the slices that differ out of the folder (they usually come from another acquisition filed under "
        "the same SeriesInstanceUID, e.g. a localizer or a reformat), or re-export the series."
    )
    _refuse_mixed(folder, headers, "image size (Rows x Columns)", lambda h: h.size,
                  lambda v: f"{v[0]} x {v[1]}", lambda a, b: a == b, fix)
    if headers[0].size is not None:  # what the stacked volume will need, before GDCM allocates it
        rows, columns = headers[0].size
        check_header(folder, (int(columns), int(rows), len(headers)), 2, None, "DICOM series")
    multi = [h for h in headers if h.frames > 1]
    if multi:
        raise VolumeReadError(
            f"{folder}: {len(multi)} of the {len(headers)} files of this series are multi-frame "
            f"({_names([h.path for h in multi])}; NumberOfFrames {multi[0].frames}), which cannot be stacked as "
            "slices of one volume. Load each multi-frame file on its own (point at the file, not the folder)."
        )
    _refuse_mixed(folder, headers, "ImageOrientationPatient", lambda h: h.orientation, _format_floats,
                  lambda a, b: np.allclose(a, b, rtol=0.0, atol=ORIENTATION_ATOL), fix)
    _refuse_mixed(folder, headers, "PixelSpacing", lambda h: h.spacing, _format_floats,
                  lambda a, b: np.allclose(a, b, rtol=SPACING_RTOL, atol=1e-6), fix)

    orientation = headers[0].orientation
    placed = [h for h in headers if h.position is not None]
    if orientation is None or not placed:
        log.debug("%s: no ImageOrientationPatient/ImagePositionPatient; slice order left to GDCM", folder)
        return [h.path for h in headers], None
    if len(placed) < len(headers):
        unplaced = [h.path for h in headers if h.position is None]
        raise VolumeReadError(
            f"{folder}: {len(unplaced)} of the {len(headers)} slices have no ImagePositionPatient "
            f"({_names(unplaced)}), so they cannot be placed in the volume. Remove them or re-export the series."
        )
    row, column = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, column)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-2) or abs(float(row @ column)) > 1e-2:
        raise VolumeReadError(
            f"{headers[0].path}: ImageOrientationPatient {_format_floats(orientation)} is not two perpendicular "
            "unit vectors, so the slice normal is undefined. The header is malformed; re-export the series."
        )
    along = {h.path: float(h.position @ normal) for h in placed}
    ordered = sorted(placed, key=lambda h: (along[h.path], str(h.path)))
    unique = _drop_identical_duplicates(folder, ordered, along)
    _refuse_gaps(folder, unique, along)
    step = (along[unique[-1].path] - along[unique[0].path]) / (len(unique) - 1) if len(unique) > 1 else None
    return [h.path for h in unique], step


def _refuse_mixed(
    folder: Path,
    headers: list[_SliceHeader],
    what: str,
    value_of: Callable[[_SliceHeader], Any],
    show: Callable[[Any], str],
    same: Callable[[Any, Any], bool],
    fix: str,
) -> None:
    """Refuse a series whose slices disagree on one header value, listing each value and its files."""
    groups: list[tuple[Any, list[Path]]] = []
    for h in headers:
        value = value_of(h)
        for group_value, paths in groups:
            if (value is None) == (group_value is None) and (value is None or same(value, group_value)):
                paths.append(h.path)
                break
        else:
            groups.append((value, [h.path]))
    if len(groups) < 2:
        return
    groups.sort(key=lambda g: -len(g[1]))
    listing = "; ".join(
        f"{'absent' if value is None else show(value)} in {len(paths)} file(s) ({_names(paths)})"
        for value, paths in groups
    )
    raise VolumeReadError(f"{folder}: the slices of this series differ in {what}: {listing}. {fix}")


def _drop_identical_duplicates(folder: Path, ordered: list[_SliceHeader], along: dict[Path, float]) -> list[_SliceHeader]:
    """One slice per position: identical copies are dropped (logged), different slices are refused."""
    groups: list[list[_SliceHeader]] = []
    for h in ordered:
        if groups and along[h.path] - along[groups[-1][0].path] < SAME_POSITION_MM:
            groups[-1].append(h)
        else:
            groups.append([h])
    unique = []
    for group in groups:
        if len(group) > 1:
            group = sorted(group, key=lambda h: str(h.path))
            _refuse_conflicting(folder, group)
            log.warning(
                "%s: %s hold identical slices at ImagePositionPatient %s; reading %s and skipping the other(s)",
                folder, _names([h.path for h in group], limit=len(group)), _format_floats(group[0].position),
                group[0].path.name,
            )
        unique.append(group[0])
    return unique


def _refuse_conflicting(folder: Path, group: list[_SliceHeader]) -> None:
    """Slices at one position must be the same slice: same position in-plane and same pixel values."""
    first = group[0]
    names = _names([h.path for h in group], limit=len(group))
    where = f"ImagePositionPatient {_format_floats(first.position)}"
    fix = (
        "Keep one of them and move the other(s) out of the folder (two reconstructions or acquisitions filed under "
        "one SeriesInstanceUID, or a slice sent twice with changes), or re-export the series."
    )
    reference = _pixels(first.path)
    for other in group[1:]:
        shift = np.asarray(other.position, float) - np.asarray(first.position, float)
        if not np.allclose(shift, 0.0, rtol=0.0, atol=SAME_POSITION_MM):
            raise VolumeReadError(
                f"{folder}: {names} sit at one slice position along the normal but are shifted in-plane "
                f"({_format_floats(first.position)} vs {_format_floats(other.position)}). {fix}"
            )
        pixels = _pixels(other.path)
        if pixels.shape != reference.shape or not np.array_equal(pixels, reference):
            differ = int(np.count_nonzero(pixels != reference)) if pixels.shape == reference.shape else pixels.size
            instances = ", ".join(f"{h.path.name}: {h.instance or '?'}" for h in group)
            raise VolumeReadError(
                f"{folder}: duplicate slice position: {names} sit at {where} but hold different pixel data "
                f"({first.path.name} vs {other.path.name}: {differ} of {reference.size} pixels differ; "
                f"InstanceNumber {instances}). {fix}"
            )


def _pixels(path: Path) -> np.ndarray:
    import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs
    try:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as err:
        raise VolumeReadError(
            f"{path}: the pixel data cannot be decoded ({_last_line(err)}); the file is probably truncated or uses a "
            "compression this SimpleITK build lacks. Replace it from the original export or re-export the series."
        ) from err


def _refuse_gaps(folder: Path, unique: list[_SliceHeader], along: dict[Path, float]) -> None:
    """Neighbouring slices must be one (median) step apart along the normal: no gaps, no uneven steps."""
    if len(unique) < 3:
        return
    steps = np.diff([along[h.path] for h in unique])
    median = float(np.median(steps))

    def between(i: int) -> str:
        a, b = unique[i], unique[i + 1]
        return (f"{a.path.name} at {_format_floats(a.position)} and {b.path.name} at {_format_floats(b.position)} "
                f"are {steps[i]:.4g} mm apart")

    gaps = [i for i, step in enumerate(steps) if step > GAP_FACTOR * median]
    if gaps:
        shown = "; ".join(
            f"{between(i)} (about {max(1, round(steps[i] / median) - 1)} slice(s) missing)" for i in gaps[:_NAMES_SHOWN]
        )
        more = f"; and {len(gaps) - _NAMES_SHOWN} more gap(s)" if len(gaps) > _NAMES_SHOWN else ""
        raise VolumeReadError(
            f"{folder}: slices missing from this series of {len(unique)} slices: the expected step between slices "
            f"is {median:.4g} mm (the median along the slice normal), but {shown}{more}. Reading on would stretch "
            "the volume. Re-export or re-copy the full series (check that the transfer finished)."
        )
    uneven = [i for i, step in enumerate(steps) if abs(step - median) > UNEVEN_RTOL * median]
    if uneven:
        shown = "; ".join(between(i) for i in uneven[:_NAMES_SHOWN])
        more = f"; and {len(uneven) - _NAMES_SHOWN} more" if len(uneven) > _NAMES_SHOWN else ""
        raise VolumeReadError(
            f"{folder}: uneven slice spacing: the steps between slices along the slice normal range from "
            f"{steps.min():.4g} to {steps.max():.4g} mm (median {median:.4g} mm); {shown}{more}. A volume needs one "
            "step between all slices: remove slices that belong to another reconstruction, or resample the series "
            "to even spacing before use."
        )


def _last_line(err: BaseException) -> str:
    """The last line of an ITK error: the cause (the lines above are ITK file/line noise)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def _names(paths: Sequence[Path], limit: int = _NAMES_SHOWN) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def _format_floats(values: Any) -> str:
    return "(" + ", ".join(f"{round(float(v), 4):g}" for v in values) + ")"


def _describe_series(folder: Path, uid: str) -> str:
    import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid)
    description = ""
    if files:
        header = sitk.ImageFileReader()
        header.SetFileName(files[0])
        header.ReadImageInformation()
        if header.HasMetaDataKey("0008|103e"):
            description = header.GetMetaData("0008|103e").strip()
    return f"{uid} ({len(files)} files{', ' + repr(description) if description else ''})"
