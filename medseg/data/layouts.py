"""What a user's dataset folder is: its layout, its cases, and what the layout says about them.

:func:`detect_layout` recognises, in this order:

=====================  ==========================================================  ===============
kind                   folder                                                      task_hint
=====================  ==========================================================  ===============
``msd``                ``imagesTr/`` + ``labelsTr/`` listed in ``dataset.json``    segmentation
``nnunet``             ``imagesTr/X_0000.nii.gz`` ... + ``labelsTr/X.nii.gz``      segmentation
``images_labels``      ``images/`` + ``labels/`` (or ``masks/``), same file names  segmentation
``csv``                ``<root>/*.csv`` (or the CSV itself) with ``path,label``    by the labels
                       [``,split``] columns, paths relative to the CSV's folder
``imagefolder_splits`` ``<root>/{train,val,test}/<class>/*.png``                   classification
``imagefolder``        ``<root>/<class>/*.png`` (torchvision ``ImageFolder``)      classification
``case_folders``       ``<root>/<case>/image.<ext>`` (or ``image/``, a DICOM       segmentation
                       series) and optionally ``label.<ext>`` (``label.dcm``: a
                       DICOM SEG)
=====================  ==========================================================  ===============

Class indices follow torchvision: the sorted class-folder names (or, in a CSV, the sorted class
names) numbered from 0. In every layout a ``dataset.json`` at the root fills ``channel_names``
(nnU-Net v2 ``channel_names`` or MSD ``modality``) and ``labels`` (nnU-Net v2
``{"background": 0, ...}`` or MSD ``{"0": "background", ...}``).

The first three layouts are discovered by :mod:`medseg.data.manifest` (one implementation for
both); ``build_manifest`` builds its manifest from the layout detected here. Which ``imagesTr``
files are one case's channels is decided by :func:`medseg.io.discovery.group_channel_files`, as
for ``medseg predict``: with dataset.json's channel count when it names one, else only when the
folder's cases agree on it; what it leaves in doubt becomes a note.
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.data.folders import dataset_json_channel_count, discover_paired_layout, read_dataset_json
from medseg.data.manifest import Case
from medseg.errors import ManifestError
from medseg.io.discovery import group_channel_files
from medseg.io.formats import FORMATS, strip_volume_suffix

KINDS = ("msd", "nnunet", "images_labels", "imagefolder", "imagefolder_splits", "csv", "case_folders")
#: Split folder names of an ImageFolder with splits, and the manifest split each stands for.
SPLIT_FOLDERS = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}
_KIND_TEXT = {
    "msd": "Medical Segmentation Decathlon (imagesTr/ + labelsTr/ listed in dataset.json)",
    "nnunet": "nnU-Net (imagesTr/ + labelsTr/)",
    "images_labels": "images/ + labels/ folders",
    "imagefolder": "ImageFolder (one folder per class)",
    "imagefolder_splits": "ImageFolder with split folders (<split>/<class>/)",
    "csv": "CSV of path,label rows",
    "case_folders": "one folder per case (image + optional label)",
}


@dataclass(frozen=True)
class DatasetLayout:
    """A dataset as found on disk.

    Attributes:
        kind: one of :data:`KINDS`.
        root: the data root; every path in ``cases`` is relative to it.
        cases: the cases; ``split`` is "" unless the layout itself gives splits.
        task_hint: ``"segmentation"`` (``Case.label`` is a label-map path) or ``"classification"``
            (``Case.label`` is a class index).
        labels: label value (or class index) -> name, when the layout gives names.
        channel_names: input channel names from dataset.json, else None.
        notes: things the user should know (unlabelled cases, skipped folders, ...).
    """

    kind: str
    root: Path
    cases: tuple[Case, ...]
    task_hint: str
    labels: dict[int, str] | None
    channel_names: list[str] | None
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One paragraph: layout, number of cases and labelled ones, formats, channels, classes, splits."""
        labelled = sum(c.label is not None for c in self.cases)
        formats = Counter(_format_name(self.root / p) for c in self.cases for p in c.images)
        parts = [f"{_KIND_TEXT.get(self.kind, self.kind)} at {self.root}: {len(self.cases)} case(s), "
                 f"{labelled} labelled ({self.task_hint})"]
        parts.append("formats: " + ", ".join(f"{name} ({n} file(s))" for name, n in sorted(formats.items())))
        per_case = sorted({len(c.images) for c in self.cases})
        channels = f"channels: {'/'.join(str(n) for n in per_case)} file(s) per case"
        if self.channel_names:
            channels += f" ({', '.join(self.channel_names)})"
        parts.append(channels)
        if self.task_hint == "classification":
            counts = Counter(c.label for c in self.cases if c.label is not None)
            names = self.labels or {}
            parts.append("classes: " + ", ".join(
                f"{k} {names.get(k, '?')} ({counts.get(str(k), 0)})"
                for k in sorted({*names, *(int(v) for v in counts)})))
        elif self.labels:
            parts.append("labels: " + ", ".join(f"{k} {v}" for k, v in sorted(self.labels.items())))
        splits = Counter(c.split for c in self.cases if c.split)
        parts.append("splits: " + (", ".join(f"{s} {n}" for s, n in sorted(splits.items())) if splits
                                   else "none given (assigned when the manifest is built)"))
        text = "; ".join(parts) + "."
        if self.notes:
            text += " Notes: " + " ".join(self.notes)
        return text


def detect_layout(root: Path) -> DatasetLayout:
    """The layout of a dataset folder (or of a ``path,label`` CSV given directly).

    Raises:
        ManifestError: the folder matches no layout, or matches one with problems (a single class
            folder, a CSV row whose file does not exist, a case folder with two images, ...): the
            message says what was expected, what was found, where, and how to fix it.
    """
    root = Path(root)
    if root.is_file():
        if root.suffix.lower() != ".csv":
            raise ManifestError(f"--from {root}: Expected a dataset folder or a CSV of path,label rows. Got a "
                                f"{root.suffix or 'suffix-less'} file. Point at the dataset's folder.")
        return _with_dataset_json(_from_csv(root))
    if not root.is_dir():
        raise ManifestError(f"--from {root}: no such folder or file; check the path")
    paired = discover_paired_layout(root)
    if paired is not None:
        kind, cases = paired
        unlabelled = [c.case_id for c in cases if c.label is None]
        notes: tuple[str, ...] = (f"{len(unlabelled)} case(s) have no label ({_names(unlabelled)}).",) \
            if unlabelled else ()
        notes += _channel_notes(root) if kind == "nnunet" else ()
        return _with_dataset_json(DatasetLayout(kind, root, tuple(cases), "segmentation", None, None, notes))
    csvs = [p for p in sorted(root.glob("*.csv")) if not p.name.startswith(".") and _has_path_column(p)]
    if len(csvs) > 1:
        raise ManifestError(f"{root}: Expected one CSV of path,label rows. Got {len(csvs)}: "
                            f"{', '.join(p.name for p in csvs)}. Pass the one to use: --from {csvs[0]}")
    if csvs:
        return _with_dataset_json(_from_csv(csvs[0]))
    folders = _subfolders(root)
    if any(_case_image(f) for f in folders):
        return _with_dataset_json(_from_case_folders(root, folders))
    split_folders = [f for f in folders if f.name.lower() in SPLIT_FOLDERS]
    if split_folders and any(_subfolders(f) for f in split_folders):
        return _with_dataset_json(_from_imagefolder_splits(root, split_folders))
    with_images = [f for f in folders if _images_in(f)]
    # Class folders: two or more folders of images, or (a lone folder, then refused) of 2D pictures;
    # a lone folder of volumes (scans/*.nii.gz) is not taken for a one-class ImageFolder.
    if len(with_images) > 1 or any(_is_2d(p) for f in with_images for p in _images_in(f)):
        return _with_dataset_json(_from_imagefolder(root, folders))
    raise ManifestError(
        f"{root}: no known layout. Expected one of: imagesTr/ + labelsTr/ (MSD, nnU-Net); images/ + "
        "labels/; <class>/*.png (ImageFolder) or train|val|test/<class>/*.png; a CSV with path,label columns; "
        "<case>/image.<ext> [+ label.<ext>] folders. "
        f"Got: {', '.join(sorted(p.name for p in root.iterdir())[:8]) or 'an empty folder'}. "
        "Arrange the files in one of these layouts, or write a CSV listing them.")


# ----------------------------------------------------------------------------------- helpers


def _names(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _channel_notes(root: Path) -> tuple[str, ...]:
    """What the channel grouping of an nnU-Net folder left in doubt (numbered files it did not group,
    :func:`~medseg.io.discovery.group_channel_files`): the cases came from the same call in
    :mod:`medseg.data.manifest`, which has no notes to return."""
    channels = dataset_json_channel_count(root)
    folders = [root / "imagesTr"] + ([root / "imagesTs"] if (root / "labelsTs").is_dir() else [])
    return tuple(note for folder in folders if folder.is_dir()
                 for note in group_channel_files(_images_in(folder), channels)[1])


def _format_name(path: Path) -> str:
    fmt = FORMATS.for_path(path) if path.exists() else FORMATS.by_suffix(path.name)
    return fmt.name if fmt is not None else "unknown"


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    """Image files of a registered format directly in ``folder`` (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and FORMATS.by_suffix(p.name) is not None)


def _is_2d(path: Path) -> bool:
    fmt = FORMATS.by_suffix(path.name)
    return fmt is not None and fmt.name == "image2d"


def _case_image(folder: Path) -> list[Path]:
    """The ``image.<ext>`` files and ``image/`` series folder of a case folder."""
    found = [p for p in _images_in(folder) if strip_volume_suffix(p.name).lower() == "image"]
    if (folder / "image").is_dir():
        found.append(folder / "image")
    return found


def dataset_json_names(root: Path) -> tuple[list[str] | None, dict[int, str] | None]:
    """Channel names and label names from ``<root>/dataset.json`` (MSD or nnU-Net v2), if there is one.

    Raises:
        ManifestError: the file is not valid JSON, or its channel names are malformed.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None, None
    meta = read_dataset_json(path)
    return _channel_names(meta.get("channel_names") or meta.get("modality"), path), _label_names(meta.get("labels"), path)


def _with_dataset_json(layout: DatasetLayout) -> DatasetLayout:
    """Fill channel names and label names from a dataset.json at the root (they win over folder names
    only where the layout gave none)."""
    channels, labels = dataset_json_names(layout.root)
    if channels is None and labels is None:
        return layout
    return DatasetLayout(layout.kind, layout.root, layout.cases, layout.task_hint,
                         layout.labels if layout.labels else labels, channels or layout.channel_names, layout.notes)


def _channel_names(entry: Any, path: Path) -> list[str] | None:
    if not entry:
        return None
    if not isinstance(entry, dict):
        raise ManifestError(f"{path}: Expected channel_names/modality as an object like {{\"0\": \"CT\"}}. "
                            f"Got {entry!r}. Fix dataset.json.")
    try:
        return [str(v) for _, v in sorted(entry.items(), key=lambda kv: int(kv[0]))]
    except ValueError:
        raise ManifestError(f"{path}: Expected channel_names/modality keys to be channel numbers (\"0\", \"1\"). "
                            f"Got {sorted(entry)}. Fix dataset.json.") from None


def _label_names(entry: Any, path: Path) -> dict[int, str] | None:
    if not entry or not isinstance(entry, dict):
        return None
    names: dict[int, str] = {}
    for key, value in entry.items():
        if isinstance(value, int) and not isinstance(value, bool):  # nnU-Net v2: {"background": 0}
            names[value] = str(key)
        elif str(key).lstrip("-").isdigit():  # MSD: {"0": "background"}
            names[int(key)] = str(value)
        # nnU-Net region labels ({"whole_tumor": [1, 2, 3]}) name no single value: left out
    return names or None


# ----------------------------------------------------------------------------------- ImageFolder


def _class_folders(root: Path, folders: list[Path], where: str) -> list[str]:
    names = [f.name for f in folders]
    if len(names) < 2:
        raise ManifestError(
            f"{where}: Expected at least two class folders (<root>/<class>/*.png, one folder per class). "
            f"Got {len(names)}: {names}. Folder: {where}. Add a folder per class, or, if the images are of one "
            "class and the labels live elsewhere, list them in a CSV with path,label columns.")
    return names


def _from_imagefolder(root: Path, folders: list[Path]) -> DatasetLayout:
    classes = _class_folders(root, folders, str(root))
    index = {name: i for i, name in enumerate(classes)}
    cases, notes = _class_cases(root, folders, index, split="", prefix="")
    return DatasetLayout("imagefolder", root, tuple(cases), "classification", {i: n for n, i in index.items()},
                         None, tuple(notes))


def _from_imagefolder_splits(root: Path, split_folders: list[Path]) -> DatasetLayout:
    other = [p.name for p in _subfolders(root) if p.name.lower() not in SPLIT_FOLDERS]
    notes = [f"folder(s) {other} next to the split folders are not read."] if other else []
    seen = sorted({c.name for f in split_folders for c in _subfolders(f)})
    classes = _class_folders(root, [root / n for n in seen], f"{root} (class folders across {[f.name for f in split_folders]})")
    index = {name: i for i, name in enumerate(classes)}
    cases: list[Case] = []
    for folder in split_folders:
        split = SPLIT_FOLDERS[folder.name.lower()]
        found, more = _class_cases(root, _subfolders(folder), index, split=split, prefix=f"{folder.name}__")
        cases.extend(found)
        notes.extend(more)
    return DatasetLayout("imagefolder_splits", root, tuple(cases), "classification",
                         {i: n for n, i in index.items()}, None, tuple(notes))


def _class_cases(root: Path, folders: list[Path], index: dict[str, int], split: str,
                 prefix: str) -> tuple[list[Case], list[str]]:
    cases, notes = [], []
    for folder in folders:
        images = _images_in(folder)
        if not images:
            notes.append(f"class folder {folder.relative_to(root)} holds no images (class {index[folder.name]} "
                         "keeps its index).")
        for path in images:
            case_id = _safe_id(f"{prefix}{folder.name}__{strip_volume_suffix(path.name)}")
            cases.append(Case(case_id, (path.relative_to(root).as_posix(),), str(index[folder.name]), split))
    return cases, notes


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip("._-") or "case"


# ----------------------------------------------------------------------------------- CSV


def _has_path_column(path: Path) -> bool:
    try:
        with open(path, newline="") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError):
        return False
    return "path" in [h.strip().lower() for h in header]


def _from_csv(path: Path) -> DatasetLayout:
    root = path.parent
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip().lower() for h in (reader.fieldnames or [])]
        if "path" not in header or "label" not in header:
            raise ManifestError(f"{path}: Expected columns path,label (optionally split). Got {reader.fieldnames}. "
                                "Name the columns in the first line.")
        rows = [({k.strip().lower(): (v or "").strip() for k, v in row.items() if k is not None}, line)
                for line, row in enumerate(reader, start=2)]
    if not rows:
        raise ManifestError(f"{path}: Expected one row per image. Got only the header line. Add the rows.")
    for row, line in rows:
        if not row["path"]:
            raise ManifestError(f"{path}:{line}: Expected an image path. Got an empty path cell. Fill it or drop the row.")
        image = root / row["path"]
        if not image.exists():
            raise ManifestError(f"{path}:{line}: Expected the image {row['path']} (relative to {root}). Got: no such "
                                f"file ({image}). Fix the path on line {line}, or restore the file.")
        split = row.get("split", "")
        if split and split.lower() not in SPLIT_FOLDERS:
            raise ManifestError(f"{path}:{line}: Expected split train, val or test (or empty). Got {split!r}. "
                                "Fix the split column.")
    splits = [SPLIT_FOLDERS.get(row.get("split", "").lower(), "") for row, _ in rows]
    if any(splits) and not all(splits):
        blank = [line for (row, line), s in zip(rows, splits) if not s]
        raise ManifestError(f"{path}: Expected a split on every row or on none. Got empty splits on line(s) "
                            f"{blank[:5]}. Fill them in, or remove the split column to have splits assigned.")
    labels = [row["label"] for row, _ in rows]
    given = [v for v in labels if v]
    notes = []
    unlabelled = [row["path"] for row, _ in rows if not row["label"]]
    if unlabelled:
        notes.append(f"{len(unlabelled)} row(s) have no label ({_names(unlabelled)}).")
    names: dict[int, str] | None = None
    if given and all(FORMATS.by_suffix(v) is not None and (root / v).exists() for v in given):
        task, values = "segmentation", [v or None for v in labels]
    elif all(re.fullmatch(r"-?\d+", v) for v in given):
        task, values = "classification", [str(int(v)) if v else None for v in labels]
    else:
        classes = sorted(set(given))
        names = dict(enumerate(classes))
        index = {n: i for i, n in names.items()}
        task, values = "classification", [str(index[v]) if v else None for v in labels]
    ids = [strip_volume_suffix(Path(row["path"]).name) for row, _ in rows]
    if len(set(ids)) < len(ids):  # same file name in several folders: use the relative path
        ids = [strip_volume_suffix(row["path"]).replace("/", "__") for row, _ in rows]
    ids = [_safe_id(i) for i in ids]
    duplicates = sorted(i for i, n in Counter(ids).items() if n > 1)
    if duplicates:
        raise ManifestError(f"{path}: Expected each image once. Got {_names(duplicates)} more than once. "
                            "Remove the repeated rows.")
    cases = tuple(Case(case_id, (row["path"],), value, split)
                  for case_id, (row, _), value, split in zip(ids, rows, values, splits))
    return DatasetLayout("csv", root, cases, task, names, None, tuple(notes))


# ----------------------------------------------------------------------------------- case folders


def _from_case_folders(root: Path, folders: list[Path]) -> DatasetLayout:
    cases, notes, skipped = [], [], []
    for folder in folders:
        images = _case_image(folder)
        if not images:
            skipped.append(folder.name)
            continue
        if len(images) > 1:
            raise ManifestError(
                f"{folder}: Expected one image per case folder (image.<ext> or an image/ DICOM series folder). "
                f"Got {len(images)}: {', '.join(p.name for p in images)}. Keep one and move the others out.")
        labels = [p for p in _images_in(folder) if strip_volume_suffix(p.name).lower() == "label"]
        if len(labels) > 1:
            raise ManifestError(
                f"{folder}: Expected at most one label per case folder (label.<ext>). Got {len(labels)}: "
                f"{', '.join(p.name for p in labels)}. Keep one and move the others out.")
        label = labels[0].relative_to(root).as_posix() if labels else None
        cases.append(Case(_safe_id(folder.name), (images[0].relative_to(root).as_posix(),), label, ""))
    if skipped:
        notes.append(f"{len(skipped)} folder(s) hold no image.<ext> or image/ and were skipped ({_names(skipped)}).")
    unlabelled = [c.case_id for c in cases if c.label is None]
    if unlabelled:
        notes.append(f"{len(unlabelled)} case(s) have no label ({_names(unlabelled)}).")
    return DatasetLayout("case_folders", root, tuple(cases), "segmentation", None, None, tuple(notes))
