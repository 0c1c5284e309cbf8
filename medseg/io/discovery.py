"""Find the scans in a folder tree: one case per image file of a registered format (NIfTI, MHA,
NRRD, plugins), and per DICOM series folder or single DICOM file.

What counts as an image comes from :data:`medseg.io.formats.FORMATS`, the registry that reading
and ``manifest build`` use too.

DICOM files are grouped by folder and SeriesInstanceUID from their headers (pixel data is not
read). Non-image DICOM objects (structured reports, presentation states, ...) are skipped
with a note; a folder that mixes several image series becomes one failed case listing them,
because which series was meant cannot be guessed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseg.io.formats import FORMATS, strip_volume_suffix

_HEADER_TAGS = ["SeriesInstanceUID", "SeriesDescription", "Rows", "Columns", "NumberOfFrames", "SOPClassUID", "Modality"]


_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class InputCase:
    """One scan to predict: a file, a folder holding one DICOM series, or nnU-Net channel files.

    Attributes:
        path: the file or series folder (for channel files: the first channel's file).
        channels: the channel files in channel order (``X_0000``, ``X_0001``, ...); empty for a
            single file or series.
    """

    case_id: str
    path: Path
    kind: str  # "file" | "dicom_series" | "dicom_file"
    series_uid: str | None = None
    problem: str | None = None  # set when discovery already knows the case cannot be read
    channels: tuple[Path, ...] = ()

    @property
    def paths(self) -> tuple[Path, ...]:
        """Every file the case reads, in channel order."""
        return self.channels or (self.path,)

    @property
    def source(self) -> str | list[str]:
        """What a reader takes: the path, or the list of channel files (read as channels)."""
        return [str(p) for p in self.channels] if len(self.channels) > 1 else str(self.paths[0])

    @property
    def shown(self) -> str:
        """The input as the report shows it (channel files joined by ``;``)."""
        return ";".join(str(p) for p in self.paths)


@dataclass
class Discovery:
    cases: list[InputCase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _case_id(root: Path, path: Path, strip_suffix: bool) -> str:
    """A file-name-safe id from the path below ``root``; never hidden (no leading dot), never empty.

    The root itself (``--input .`` on a DICOM series folder) is named after the folder it resolves to.
    """
    rel = path.relative_to(root) if path != root else Path(path.resolve().name)
    parts = list(rel.parts) or [path.resolve().name]
    if strip_suffix:
        parts[-1] = strip_volume_suffix(parts[-1])
    # no leading dot (hidden) or dash (read as an option by shell tools)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", "__".join(parts)).lstrip("._-") or "case"


def discover(root: Path) -> Discovery:
    """All scans under ``root`` (recursively), sorted by case id.

    Raises:
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    if not root.exists():
        raise FileNotFoundError(f"--input {root}: no such file or folder")
    found = Discovery()
    if root.is_file():
        found.cases.append(InputCase(_case_id(root.parent, root, True), root, "file"))
        return found
    dicom_by_folder: dict[Path, list[Path]] = defaultdict(list)
    files: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        fmt = FORMATS.for_path(path)
        if fmt is None:
            continue
        if fmt.series:  # DICOM: files are grouped into series per folder below
            dicom_by_folder[path.parent].append(path)
        else:
            files.append(path)
    found.cases.extend(_file_cases(root, files))
    for folder, dicom_files in sorted(dicom_by_folder.items()):
        _dicom_cases(root, folder, dicom_files, found)
    found.cases = _refuse_shared_ids(found.cases)
    found.cases.sort(key=lambda c: (c.case_id, str(c.path)))
    return found


def _file_cases(root: Path, files: list[Path]) -> list[InputCase]:
    """One case per file, except nnU-Net channel files (``X_0000``, ``X_0001``, ...): one case per group."""
    groups: dict[tuple[Path, str], dict[int, Path]] = defaultdict(dict)
    for path in files:
        match = _CHANNEL_FILE.match(strip_volume_suffix(path.name))
        if match:
            groups[(path.parent, match["case"])][int(match["channel"])] = path
    grouped = {p for (_, _), members in groups.items() if 0 in members for p in members.values()}
    cases = [InputCase(_case_id(root, p, True), p, "file") for p in files if p not in grouped]
    for (folder, name), members in sorted(groups.items()):
        if 0 not in members:
            continue  # not nnU-Net naming (e.g. scan_2019.nii.gz): ordinary files, listed above
        ordered = tuple(members[k] for k in sorted(members))
        case_id = _case_id(root, folder / name, False)
        missing = sorted(set(range(max(members) + 1)) - set(members))
        problem = None
        if missing:
            problem = (f"{folder / name}: Expected channel files {name}_0000 to {name}_{max(members):04d} with no gap. "
                       f"Got {', '.join(p.name for p in ordered)}: channel(s) {', '.join(f'{k:04d}' for k in missing)} "
                       "missing. Files: " + ", ".join(str(p) for p in ordered) + ". Add the missing channel file, or "
                       "renumber the channels from _0000 without gaps.")
        cases.append(InputCase(case_id, ordered[0], "file", problem=problem, channels=ordered))
    return cases


def _refuse_shared_ids(cases: list[InputCase]) -> list[InputCase]:
    """Two scans whose names map to one case id would overwrite each other's outputs: fail both."""
    by_id: dict[str, list[InputCase]] = defaultdict(list)
    for case in cases:
        by_id[case.case_id].append(case)
    out = []
    for case_id, group in by_id.items():
        if len(group) == 1:
            out.extend(group)
            continue
        names = ", ".join(c.shown for c in group)
        for c in group:
            out.append(replace(c, problem=f"{c.path}: case id {case_id!r} is shared by {names}, whose outputs would "
                                          "overwrite each other; rename or move one of them"))
    return out


def _dicom_cases(root: Path, folder: Path, files: list[Path], found: Discovery) -> None:
    series: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    unreadable: list[tuple[Path, str]] = []
    for path in files:
        try:
            header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError, ValueError, EOFError) as err:
            problem = "the file is empty (0 bytes)" if _size(path) == 0 else f"{type(err).__name__}: {err}"
            found.notes.append(f"{path}: skipped, not a readable DICOM file ({problem})")
            unreadable.append((path, problem))
            continue
        if "Rows" not in header or "Columns" not in header:
            found.notes.append(f"{path}: skipped, a DICOM object without an image "
                               f"(SOP class {getattr(header, 'SOPClassUID', 'unknown')})")
            continue
        series[str(getattr(header, "SeriesInstanceUID", "unknown"))].append((path, header))
    if not series:
        # Named like DICOM but unreadable, with no series beside them to be part of: each is a failed
        # case, so the report shows it (in a series folder, the series reader names them instead).
        for path, problem in unreadable:
            if FORMATS.by_suffix(path.name) is not None:
                found.cases.append(InputCase(_case_id(root, path, True), path, "dicom_file", problem=(
                    f"{path}: not a readable DICOM file ({problem}). Copy or export it again, or move it out of "
                    "the input folder.")))
        return
    case_id = _case_id(root, folder, False)
    if len(series) > 1:
        listing = "; ".join(
            f"{uid} ({len(items)} files, {str(getattr(items[0][1], 'SeriesDescription', '')).strip()!r})"
            for uid, items in sorted(series.items())
        )
        found.cases.append(InputCase(
            case_id, folder, "dicom_series",
            problem=f"{folder}: holds {len(series)} DICOM image series: {listing}. "
                    "Put each series in its own folder so each becomes one case."))
        return
    ((uid, items),) = series.items()
    if len(items) == 1:
        path = items[0][0]
        found.cases.append(InputCase(_case_id(root, path, True), path, "dicom_file", series_uid=uid))
    else:
        found.cases.append(InputCase(case_id, folder, "dicom_series", series_uid=uid))


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def discover_paths(paths: list[Path]) -> Discovery:
    """The scans at each of ``paths`` (a file, a DICOM series folder, or a folder of scans), as one
    batch: what a served model receives as a column of paths. A path that does not exist is a
    failed case of its own, not an error for the whole batch."""
    found = Discovery()
    for path in paths:
        path = Path(path)
        if not path.exists():
            found.cases.append(InputCase(_case_id(path.parent, path, True) if path.name else "case", path, "file",
                                         problem=f"{path}: no such file or folder"))
            continue
        one = discover(path)
        found.notes.extend(one.notes)
        if not one.cases:
            found.cases.append(InputCase(_case_id(path.parent, path, True), path, "file",
                                         problem=f"{path}: no scan found there (expected one of: {FORMATS.describe()})"))
        found.cases.extend(one.cases)
    found.cases = _refuse_shared_ids(found.cases)
    return found
