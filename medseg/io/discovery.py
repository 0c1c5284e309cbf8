"""Find the scans in a folder tree: one case per image file of a registered format (NIfTI, MHA,
NRRD, plugins), and per DICOM series folder or single DICOM file.

What counts as an image comes from :data:`medseg.io.formats.FORMATS`, the registry that reading
and ``manifest build`` use too. Which numbered files (``X_0000``, ``X_0001``, ...) are one case's
channels depends on the model's channel count: :func:`group_channel_files` decides it, here and
for ``manifest build``.

DICOM files are grouped by folder and SeriesInstanceUID from their headers (pixel data is not
read). Non-image DICOM objects (structured reports, presentation states, ...) are skipped
with a note; a folder that mixes several image series becomes one failed case listing them,
because which series was meant cannot be guessed.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Sequence, Sized
from dataclasses import dataclass, field, replace
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseg.io.formats import FORMATS, strip_volume_suffix
from medseg.io.uris import uri_name

_HEADER_TAGS = ["SeriesInstanceUID", "SeriesDescription", "Rows", "Columns", "NumberOfFrames", "SOPClassUID", "Modality"]


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
    uri: str | None = None  # a scan named by URI in a table (s3://...): fetched to a local ``path`` when read

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
        """The input as the report shows it (its URI, or channel files joined by ``;``)."""
        return self.uri or ";".join(str(p) for p in self.paths)


@dataclass
class Discovery:
    """The cases found, notes about how they were grouped, and the folders searched recursively
    (an output folder inside one of them would be taken for scans by the next search)."""

    cases: list[InputCase] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    folders: list[Path] = field(default_factory=list)


#: nnU-Net's channel file names: ``<case>_<channel as four digits>`` (``BRATS_001_0000.nii.gz``).
_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")
#: The most channels a folder's file names alone may group into one case. Multi-channel datasets
#: have a handful (MSD prostate 2, BraTS 4); a longer run of numbered files is a series of scans.
MAX_GUESSED_CHANNELS = 8
#: How many file names a message shows before it counts the rest.
_SHOWN = 5


@dataclass(frozen=True)
class FileGroup:
    """The files of one case, as :func:`group_channel_files` groups them.

    Attributes:
        name: the case's name: the file name without its volume suffix, or, for channel files,
            without the ``_0000`` channel number too.
        files: one image file, or the channel files in channel order.
        channels: whether ``files`` are channel files (``name`` then drops their ``_dddd``).
        problem: why the case cannot be read (channel files missing), else None.
    """

    name: str
    files: tuple[Path, ...]
    channels: bool = False
    problem: str | None = None


def group_channel_files(paths: Sequence[Path], channels: int | None) -> tuple[list[FileGroup], list[str]]:
    """Which image files are the channels of one case, by nnU-Net's naming ``X_0000``, ``X_0001``, ...

    The one place this is decided: ``medseg predict``, ``manifest build``, ``verify``, ``plan``
    and the dataset layouts all group files here. Files are grouped per folder; a *numbered
    name* ``X`` is the set of files ``X_dddd`` (four digits) of one folder.

    With a channel count ``C`` (a model's ``in_channels``, or dataset.json's ``channel_names``):

    * ``X``'s numbers are exactly ``0000`` .. ``C-1``: one case ``X`` of ``C`` channels, in order
      (so with ``C = 1`` a lone ``X_0000`` is case ``X``, as nnU-Net names single-channel cases);
    * they start at ``0000`` and are at most ``C`` files, but not exactly those (a gap, a missing
      last channel): case ``X``, failed, with a problem naming the missing channels;
    * anything else (more files than channels, as ``test_0000`` .. ``test_0623`` exported from
      MedMNIST; no ``0000``, as ``scan_0001``): each file is a case of its own, named by its file.

    Without a count (no model, no dataset.json) each folder's count is guessed from its names:
    ``C = k`` when at least two names are numbered from ``0000``, every one of them exactly
    ``0000`` .. ``k-1`` with the same ``k``, and ``2 <= k <= MAX_GUESSED_CHANNELS``; else ``C = 1``.
    Agreement between cases is what tells channels from numbered scans: a single numbered name
    (one case's channels, or a run of scans?) is ambiguous and is not grouped.

    A folder whose grouping is in doubt gets one note: the rule, a few of the names (never all
    of them) and how to choose.

    Args:
        paths: image files (DICOM series are grouped elsewhere, by their headers).
        channels: the number of input channels, or None to guess it per folder.

    Returns:
        The cases (each file in exactly one), sorted by folder and name, and the notes.

    Raises:
        ValueError: ``channels`` below 1.
    """
    if channels is not None and channels < 1:
        raise ValueError(f"channels must be at least 1 or None (guess from the file names), got {channels}")
    by_folder: dict[Path, list[Path]] = defaultdict(list)
    for path in paths:
        by_folder[Path(path).parent].append(Path(path))
    groups: list[FileGroup] = []
    notes: list[str] = []
    for folder, files in sorted(by_folder.items()):
        found, note = _group_folder(folder, sorted(files), channels)
        groups.extend(found)
        notes.extend([note] if note else [])
    return groups, notes


def _group_folder(folder: Path, files: list[Path], channels: int | None) -> tuple[list[FileGroup], str | None]:
    """One folder: files not named ``X_dddd`` are cases of their own; the numbered ones are grouped by name."""
    numbered: dict[str, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    groups: list[FileGroup] = []
    for path in files:
        stem = strip_volume_suffix(path.name)
        match = _CHANNEL_FILE.match(stem)
        if match is None:
            groups.append(FileGroup(stem, (path,)))
        else:
            numbered[match["case"]][int(match["channel"])].append(path)
    for name in [n for n, members in numbered.items() if any(len(paths) > 1 for paths in members.values())]:
        # x_0000.nii.gz beside x_0000.mha are not two channels: files of their own, whose shared
        # case id x_0000 discovery then refuses
        groups.extend(FileGroup(strip_volume_suffix(p.name), (p,)) for paths in numbered.pop(name).values()
                      for p in paths)
    return _group_numbered(folder, {n: {k: v[0] for k, v in m.items()} for n, m in numbered.items()}, groups,
                           channels)


def _group_numbered(folder: Path, numbered: dict[str, dict[int, Path]], groups: list[FileGroup],
                    channels: int | None) -> tuple[list[FileGroup], str | None]:
    """Add the cases of a folder's numbered names to ``groups`` by the rule of :func:`group_channel_files`."""
    guessed, doubt = _guess_channels(numbered)
    count = channels or guessed or 1
    runs = [_span([members[k] for k in sorted(members)]) for _, members in sorted(numbered.items())
            if 0 in members and len(members) > 1]  # what a note shows: the names numbered like channels
    loose: list[str] = []  # of those, the ones read file by file
    for name, members in sorted(numbered.items()):
        ordered = tuple(members[k] for k in sorted(members))
        if set(members) == set(range(count)):
            groups.append(FileGroup(name, ordered, channels=True))
        elif 0 in members and len(members) <= count:
            groups.append(FileGroup(name, ordered, channels=True,
                                    problem=_missing_channels(folder, name, members, count)))
        else:
            groups.extend(FileGroup(strip_volume_suffix(p.name), (p,)) for p in ordered)
            if 0 in members and len(members) > 1:
                loose.append(_span(ordered))
    groups.sort(key=lambda g: (g.name, str(g.files[0])))
    return groups, _folder_note(folder, channels, guessed, doubt, runs, loose)


def _guess_channels(numbered: dict[str, dict[int, Path]]) -> tuple[int | None, str | None]:
    """The channel count the names of one folder agree on (see :func:`group_channel_files`), or
    None and, when some name is numbered like channel files, why it is in doubt."""
    starts = {name: sorted(members) for name, members in numbered.items() if 0 in members}
    sizes = {len(numbers) for numbers in starts.values()}
    contiguous = all(numbers == list(range(len(numbers))) for numbers in starts.values())
    if len(starts) >= 2 and len(sizes) == 1 and contiguous and 2 <= min(sizes) <= MAX_GUESSED_CHANNELS:
        return min(sizes), None
    if not starts or max(sizes) < 2:
        return None, None  # lone X_0000 files, or nothing numbered from 0000: nothing to doubt
    if len(starts) == 1:
        ((name, numbers),) = starts.items()
        return None, (f"only one name ({name}) is numbered from _0000, so its {len(numbers)} files may as well be "
                      f"{len(numbers)} scans as {len(numbers)} channels of one case")
    if len(sizes) > 1 or not contiguous:
        counts = ", ".join(f"{name}: {len(numbers)}" for name, numbers in list(sorted(starts.items()))[:_SHOWN])
        return None, f"the names numbered from _0000 have different numbers of files ({counts}{_more(starts)})"
    return None, (f"each name has {min(sizes)} numbered files, more than the {MAX_GUESSED_CHANNELS} channels "
                  "guessed from names alone")


def _folder_note(folder: Path, channels: int | None, guessed: int | None, doubt: str | None,
                 runs: list[str], loose: list[str]) -> str | None:
    """One note for a folder whose grouping is in doubt (None when it is not)."""
    if channels is None and doubt:
        return (f"{folder}: the numbered files {_listing(runs, '; ')} are read one case each, not as the channel "
                f"files of one case: {doubt}. Channel files X_0000, X_0001, ... are grouped into one case when the "
                "channel count is known: `medseg predict` takes it from the model; for `manifest build`, give "
                "dataset.json a channel_names entry (nnU-Net v2), or list the cases with their files in a CSV.")
    if channels is not None and guessed is not None and guessed != channels:
        outcome = ("each file is read as a case of its own" if channels < guessed
                   else "each of those cases fails for its missing channels")
        return (f"{folder}: the files {_listing(runs, '; ')} are named like the channel files of {guessed}-channel "
                f"cases, but the channel count is {channels}: {outcome}. Use a model trained on {guessed} channels, "
                "or give each case the channels the model takes.")
    if channels is not None and channels > 1 and loose:
        return (f"{folder}: the numbered files {_listing(loose, '; ')} are more than the {channels} channel files "
                f"X_0000 to X_{channels - 1:04d} of one case, so each is read as a case of its own. Name each case's "
                f"channels X_0000 to X_{channels - 1:04d}, or give one file per case holding its {channels} channels.")
    return None


def _missing_channels(folder: Path, name: str, members: dict[int, Path], count: int) -> str:
    missing = [f"{k:04d}" for k in range(count) if k not in members]
    extra = [f"{name}_{k:04d}" for k in sorted(members) if k >= count]
    beyond = f"; {', '.join(extra)} beyond the last channel" if extra else ""
    got = _listing([members[k].name for k in sorted(members)])
    return (f"{folder / name}: Expected {count} channel files {name}_0000 to {name}_{count - 1:04d}. Got {got}: "
            f"channel(s) {', '.join(missing[:_SHOWN])}{_more(missing)} missing{beyond}. Add the missing channel "
            "files, or renumber the channels from _0000 without gaps.")


def _span(files: Sequence[Path]) -> str:
    """A numbered run as ``test_0000.nii.gz … test_0623.nii.gz (624 files)``."""
    if len(files) <= 2:
        return ", ".join(p.name for p in files)
    return f"{files[0].name} … {files[-1].name} ({len(files)} files)"


def _listing(items: Sequence[str], sep: str = ", ") -> str:
    """At most a few items, and how many more there are: a message never lists hundreds of files."""
    return sep.join(items[:_SHOWN]) + _more(items)


def _more(items: Sized) -> str:
    return f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else ""


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


def discover(root: Path, channels: int | None = None) -> Discovery:
    """All scans under ``root`` (recursively), sorted by case id.

    Args:
        root: a folder (searched recursively) or one file.
        channels: the model's number of input channels, which decides which files are the
            channel files of one case (:func:`group_channel_files`); None guesses it per folder.

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
    found.folders.append(root)
    dicom_by_folder: dict[Path, list[Path]] = defaultdict(list)
    files: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        fmt = FORMATS.for_path(path)
        if fmt is None:
            continue
        if fmt.labels_only:
            found.notes.append(f"{path}: skipped, a {fmt.name} file holds labels, not a scan to predict")
            continue
        if fmt.series:  # DICOM: files are grouped into series per folder below
            dicom_by_folder[path.parent].append(path)
        else:
            files.append(path)
    cases, notes = _file_cases(root, files, channels)
    found.cases.extend(cases)
    found.notes.extend(notes)
    for folder, dicom_files in sorted(dicom_by_folder.items()):
        _dicom_cases(root, folder, dicom_files, found)
    found.cases = _refuse_shared_ids(found.cases)
    found.cases.sort(key=lambda c: (c.case_id, str(c.path)))
    return found


def _file_cases(root: Path, files: list[Path], channels: int | None) -> tuple[list[InputCase], list[str]]:
    """One case per file, except channel files (``X_0000``, ``X_0001``, ...): one case per group,
    as :func:`group_channel_files` decides."""
    groups, notes = group_channel_files(files, channels)
    cases = [InputCase(_case_id(root, group.files[0].parent / group.name, False), group.files[0], "file",
                       problem=group.problem, channels=group.files if group.channels else ())
             for group in groups]
    return cases, notes


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


def discover_entries(entries: Sequence[Path | str], channels: int | None = None) -> Discovery:
    """:func:`discover_paths` where an entry may also be a URI (a ``str``, already checked by
    :func:`medseg.io.uris.check_uri`): one single-file case each, named after the URI's file name and
    fetched when it is read. The cases keep the entries' order."""
    found = Discovery()
    for entry in entries:
        if isinstance(entry, str):
            name = Path(uri_name(entry))
            found.cases.append(InputCase(_case_id(name.parent, name, True), name, "file", uri=entry))
            continue
        one = discover_paths([entry], channels)
        found.cases.extend(one.cases)
        found.notes.extend(one.notes)
        found.folders.extend(one.folders)
    found.cases = _refuse_shared_ids(found.cases)
    return found


def discover_paths(paths: list[Path], channels: int | None = None) -> Discovery:
    """The scans at each of ``paths`` (a file, a DICOM series folder, or a folder of scans), as one
    batch: what a served model receives as a column of paths. A path that does not exist is a
    failed case of its own, not an error for the whole batch. ``channels``: as for :func:`discover`."""
    found = Discovery()
    for path in paths:
        path = Path(path)
        if not path.exists():
            found.cases.append(InputCase(_case_id(path.parent, path, True) if path.name else "case", path, "file",
                                         problem=f"{path}: no such file or folder"))
            continue
        one = discover(path, channels)
        found.notes.extend(one.notes)
        found.folders.extend(one.folders)
        if not one.cases:
            found.cases.append(InputCase(_case_id(path.parent, path, True), path, "file",
                                         problem=f"{path}: no scan found there (expected one of: {FORMATS.describe()})"))
        found.cases.extend(one.cases)
    found.cases = _refuse_shared_ids(found.cases)
    return found
