"""What a dataset says about itself before it is planned: its manifest (built with nnU-Net's split
policy when there is none), its task, label names and channel names (``dataset.json``, medseg's
MedMNIST import, the folder's layout, a manifest's sidecar), and a consecutive label map."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medseg.data.build import build_manifest_from_layout, default_folds
from medseg.data.layouts import dataset_json_names, detect_layout
from medseg.data.manifest import Manifest, manifest_summary
from medseg.errors import MedsegError, UsageError


@dataclass(frozen=True)
class DatasetDescription:
    """What a dataset folder says about itself (dataset.json, medmnist_import.json, its layout)."""

    root: Path
    manifest: Manifest
    task: str | None
    labels: dict[int, str] | None
    channel_names: list[str] | None
    described: str


def describe_dataset(dataset: Path, root: Path | None, manifest_path: Path | None, seed: int,
                      progress: bool, manifests_dir: Path = Path("data_manifests")) -> DatasetDescription:
    """What ``dataset`` says about itself; a folder without ``manifest_path`` gets its manifest
    built into ``manifests_dir/<dataset name>.csv``."""
    from medseg.data.manifest import read_manifest

    if dataset.suffix.lower() == ".csv" and dataset.is_file() and _is_medseg_manifest(dataset):
        from medseg.data.sidecar import read_sidecar

        remembered = read_sidecar(dataset)
        root = root if root is not None else (remembered.root if remembered else None)
        if root is None:
            raise UsageError(f"{dataset} is a manifest: give --root, the folder its paths start from")
        manifest_path, dataset = dataset, root
    root = root or dataset
    info = _self_description(root)
    if manifest_path is not None and manifest_path.is_file():
        manifest = read_manifest(manifest_path)
        if not (info.get("task") and info.get("labels")):  # what the folder's layout says (class folders, ...)
            try:
                found = detect_layout(root)
            except MedsegError:  # a folder of files a manifest lists (an import) has no layout of its own
                found = None
            if found is not None:
                info = {"task": found.task_hint, "labels": found.labels, "channels": found.channel_names, **{
                    k: v for k, v in info.items() if v}}
        return DatasetDescription(root, manifest, info.get("task"), info.get("labels"), info.get("channels"),
                                  f"{manifest_path}: {len(manifest.cases)} cases ({manifest_summary(manifest)}), "
                                  f"root {root}")
    layout = detect_layout(dataset)
    out = manifest_path or manifests_dir / f"{dataset_name(dataset)}.csv"
    # nnU-Net's split: every case in k-fold cross-validation, a test split only from the layout's own
    # (a test folder, a CSV's split column): carving one out of a small training folder costs the model cases
    manifest = build_manifest_from_layout(layout, out, seed=seed, val_fraction=0.2, test_fraction=0.0,
                                          folds=default_folds(layout.cases))
    return DatasetDescription(layout.root, manifest, info.get("task") or layout.task_hint,
                              info.get("labels") or layout.labels, info.get("channels") or layout.channel_names,
                              layout.describe() + f"\nmanifest written: {out} ({manifest_summary(manifest)})")


def _is_medseg_manifest(path: Path) -> bool:
    with open(path, newline="") as fh:
        header = fh.readline()
    return "case_id" in header and "image" in header and "split" in header


def _self_description(root: Path) -> dict[str, Any]:
    """Labels, channel names and task from a dataset.json (MSD or nnU-Net v2) or medseg's MedMNIST import."""
    found: dict[str, Any] = {}
    medmnist = root / "medmnist_import.json"
    if medmnist.is_file():
        info = json.loads(medmnist.read_text())
        found["labels"] = {int(k): str(v) for k, v in info.get("labels", {}).items()}
        found["task"] = "classification"
        # the modality names the grey channel (imports before medseg wrote it: from the source file's name)
        from medseg.data.medmnist import KNOWN_MODALITY

        modality = info.get("modality") or KNOWN_MODALITY.get(Path(str(info.get("source", ""))).name.removesuffix(".npz"))
        found["channels"] = ["red", "green", "blue"] if info.get("channels") == 3 else [modality or "image"]
    channels, labels = dataset_json_names(root)
    if labels:
        found["labels"] = labels
    if channels:
        found["channels"] = channels
    if (root / "dataset.json").is_file():
        found.setdefault("task", "segmentation")
    return found


def dataset_name(path: Path) -> str:
    name = path.resolve().name if path.suffix.lower() != ".csv" else path.stem
    return "".join(ch if ch.isalnum() or ch in "_-" else "_" for ch in name.lower()) or "dataset"


def _label_name(text: str, value: int) -> str:
    """A name that works as a metric key (``val/dice/<name>``): short, letters, digits and ``_``."""
    words = [w for w in re.split(r"[^A-Za-z0-9]+", text) if w]
    slug = ""
    for word in words:  # whole words, up to 24 characters
        if slug and len(slug) + 1 + len(word) > 24:
            break
        slug = f"{slug}_{word}" if slug else word[:24]
    return slug or f"label_{value}"


def consecutive_labels(named: dict[int, str], found: set[int]) -> dict[int, str]:
    """Every value from 0 to the largest named or found one, so the label map is consecutive (a
    value no case holds keeps a ``label_<v>`` name and scores NaN: absent, not wrong)."""
    top = max([*named, *found, 1])
    labels = {v: _label_name(named[v], v) if v in named else ("background" if v == 0 else f"label_{v}")
              for v in range(top + 1)}
    seen: dict[str, int] = {}
    for value, name in list(labels.items()):  # two long names may share their first 24 characters
        if name in seen:
            labels[value] = f"{name}_{value}"
        seen[name] = value
    return labels


def labels_from_manifest(manifest: Manifest, class_labels: bool) -> dict[int, str] | None:
    if not class_labels:
        return None
    values = sorted({int(c.label) for c in manifest.cases if c.label not in (None, "")})
    return {v: f"class_{v}" for v in range(max(values, default=1) + 1)}
