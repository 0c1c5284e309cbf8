"""Cases found in a folder laid out the MSD or nnU-Net way (``imagesTr``/``labelsTr``, ``dataset.json``),
or as plain image/label pairs: what :mod:`medseg.data.layouts` recognises first."""

from __future__ import annotations

import json
import posixpath
from dataclasses import replace
from pathlib import Path

from medseg.data.manifest import Case
from medseg.errors import ManifestError
from medseg.io.discovery import FileGroup, group_channel_files
from medseg.io.formats import FORMATS, strip_volume_suffix


def _volumes_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, by the suffixes of the format registry (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and FORMATS.by_suffix(p.name) is not None and not p.name.startswith("."))


def discover_cases(root: Path) -> list[Case]:
    """Find image/label pairs under ``root`` in MSD, nnU-Net v2 or plain images/labels layout.

    (:func:`medseg.data.layouts.detect_layout` knows these and more layouts: ImageFolder, CSV, case folders.)

    Raises:
        ManifestError: the folder matches none of the layouts, or an image/label pair is incomplete.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"--from {root}: not a folder")
    found = discover_paired_layout(root)
    if found is None:
        raise ManifestError(
            f"{root}: no known layout. Expected imagesTr/ + labelsTr/ (MSD or nnU-Net, optional dataset.json) "
            "or images/ + labels/ folders holding files with the same names."
        )
    return found[1]


def discover_paired_layout(root: Path) -> tuple[str, list[Case]] | None:
    """The cases of an MSD (``"msd"``), nnU-Net (``"nnunet"``) or images/labels (``"images_labels"``)
    folder, with the layout's name; None when ``root`` is none of these.

    Raises:
        ManifestError: the folder has one of these layouts but an image/label pair is incomplete.
    """
    root = Path(root)
    dataset_json = root / "dataset.json"
    if (root / "imagesTr").is_dir():
        meta = read_dataset_json(dataset_json) if dataset_json.is_file() else {}
        if isinstance(meta.get("training"), list) and meta["training"]:
            return "msd", _with_test_folder(root, _from_msd_json(root, meta["training"]))
        return "nnunet", _with_test_folder(root, _from_nnunet_folders(root, root / "imagesTr", root / "labelsTr"))
    for images_name, labels_name in (("images", "labels"), ("images", "masks"), ("imgs", "masks")):
        if (root / images_name).is_dir() and (root / labels_name).is_dir():
            return "images_labels", _from_nnunet_folders(root, root / images_name, root / labels_name,
                                                         channel_suffix=False)
    if (root / "images").is_dir():  # images without labels (e.g. a test set)
        return "images_labels", _from_nnunet_folders(root, root / "images", root / "labels", channel_suffix=False)
    return None


def _with_test_folder(root: Path, training: list[Case]) -> list[Case]:
    """The training cases plus, when ``imagesTs/`` has labels in ``labelsTs/``, those as the ``test``
    split (nnU-Net tests only there). Unlabelled test images are left to ``medseg predict``."""
    if not (root / "imagesTs").is_dir() or not (root / "labelsTs").is_dir():
        return training
    test = [replace(c, split="test") for c in _from_nnunet_folders(root, root / "imagesTs", root / "labelsTs")
            if c.label]
    if not test:
        return training
    clash = sorted({c.case_id for c in training} & {c.case_id for c in test})
    if clash:
        raise ManifestError(f"{root}: case(s) {clash[:5]} are in both imagesTr/ and imagesTs/; a case is either "
                            "trained on or tested on: rename or remove one copy")
    return [replace(c, split="train") for c in training] + test


def read_dataset_json(path: Path) -> dict:
    """A dataset.json (MSD or nnU-Net) as a dict.

    Raises:
        ManifestError: not valid JSON, or not a JSON object.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); fix or remove it") from None
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: Expected a JSON object (MSD or nnU-Net dataset.json). Got a "
                            f"{type(meta).__name__}. Fix or remove the file.")
    return meta


def _from_msd_json(root: Path, training: list[dict[str, str]]) -> list[Case]:
    cases = []
    for index, item in enumerate(training):
        if not isinstance(item, dict) or not item.get("image"):
            raise ManifestError(f"{root / 'dataset.json'}: training[{index}] has no 'image' entry: {item!r}")
        image = posixpath.normpath(item["image"])  # "./imagesTr/x.nii.gz" -> "imagesTr/x.nii.gz"
        label = posixpath.normpath(item["label"]) if item.get("label") else None
        for listed in (image, label):
            if listed is not None and not (root / listed).exists():
                raise ManifestError(f"{root / 'dataset.json'}: lists {listed} but {root / listed} does not exist; "
                                    "fix dataset.json or restore the file")
        cases.append(Case(strip_volume_suffix(Path(image).name), (image,), label, ""))
    return cases


def dataset_json_channel_count(root: Path) -> int | None:
    """The number of input channels ``<root>/dataset.json`` names (nnU-Net v2 ``channel_names``, MSD
    ``modality``), or None without one: it decides which files are one case's channel files.

    Raises:
        ManifestError: dataset.json is not valid JSON.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    meta = read_dataset_json(path)
    entry = meta.get("channel_names") or meta.get("modality")
    return len(entry) if isinstance(entry, dict) and entry else None


def _from_nnunet_folders(root: Path, images: Path, labels: Path, channel_suffix: bool = True) -> list[Case]:
    """The cases of an images folder and their labels (same name). With ``channel_suffix``, nnU-Net
    channel files are grouped by :func:`medseg.io.discovery.group_channel_files`, with dataset.json's
    channel count when there is one."""
    volumes = _volumes_in(images)
    if not volumes:
        raise ManifestError(f"{images}: no image files; expected one of: {FORMATS.describe()}")
    if channel_suffix:
        groups, _ = group_channel_files(volumes, dataset_json_channel_count(root))
    else:  # images/ + labels/: the label has the image's own name, _0000 included
        groups = [FileGroup(strip_volume_suffix(p.name), (p,)) for p in volumes]
    failed = [g.problem for g in groups if g.problem]
    if failed:
        raise ManifestError(f"{images}: {len(failed)} case(s) with missing channel files. {failed[0]}"
                            + (f" ({len(failed) - 1} more such case(s).)" if len(failed) > 1 else ""))
    grouped: dict[str, tuple[Path, ...]] = {}
    for group in groups:
        if group.name in grouped:
            raise ManifestError(f"{images}: {grouped[group.name][0].name} and {group.files[0].name} both name case "
                                f"{group.name!r}. Rename or remove one of them.")
        grouped[group.name] = group.files
    label_files = {strip_volume_suffix(p.name): p for p in _volumes_in(labels)} if labels.is_dir() else {}
    cases = []
    for case_id, paths in sorted(grouped.items()):
        label = label_files.get(case_id)
        cases.append(
            Case(
                case_id,
                tuple(p.relative_to(root).as_posix() for p in paths),
                label.relative_to(root).as_posix() if label else None,
                "",
            )
        )
    orphans = sorted(set(label_files) - set(grouped))
    if orphans:
        raise ManifestError(f"{labels}: label(s) without an image: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}")
    return cases
