"""MedMNIST ``.npz`` files -> one image file per sample plus a manifest with the official split.

MedMNIST arrays are in NumPy (row, column) order, i.e. ITK's (z,) y, x. Files are written so a
viewer shows them upright: grey images as uncompressed NIfTI, RGB as MHA with vector pixels (NIfTI
has no portable 2D-RGB form). Both are byte-for-byte reproducible, so the manifest's content hashes
stay valid when another machine re-imports the same ``.npz``.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from medseg.data.manifest import Case, Manifest, sha256_of, write_manifest
from medseg.data.sidecar import ManifestInfo, write_sidecar
from medseg.errors import ManifestError
from medseg.io.atomic import atomic_path, atomic_write_text

SPLITS = ("train", "val", "test")

#: Class names from MedMNIST's ``INFO`` for the sets medseg has configs for (the npz files carry none).
KNOWN_LABELS: dict[str, dict[int, str]] = {
    "pneumoniamnist": {0: "normal", 1: "pneumonia"},
    "breastmnist": {0: "malignant", 1: "normal_or_benign"},
    "retinamnist": {i: f"grade_{i}" for i in range(5)},
    "adrenalmnist3d": {0: "normal", 1: "hyperplasia"},
    "adrenalmnist3d_64": {0: "normal", 1: "hyperplasia"},
}

#: What each of those sets images (MedMNIST's ``INFO`` descriptions): the channel name a planner reads.
KNOWN_MODALITY: dict[str, str] = {
    "pneumoniamnist": "xray",
    "breastmnist": "ultrasound",
    "retinamnist": "fundus",
    "adrenalmnist3d": "mask",
    "adrenalmnist3d_64": "mask",
}


@dataclass(frozen=True)
class ImportedMedmnist:
    manifest: Manifest
    labels: dict[int, str]
    spatial_dims: int
    channels: int
    size: tuple[int, ...]
    data_dir: Path


def _load_arrays(npz: Path) -> dict[str, np.ndarray]:
    if not npz.is_file():
        raise ManifestError(f"--from-medmnist {npz}: file not found; MedMNIST files are e.g. pneumoniamnist.npz")
    try:
        with np.load(npz) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise ManifestError(f"{npz}: not a readable .npz file ({err}); download it again from MedMNIST") from None
    missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in arrays]
    if missing:
        raise ManifestError(f"{npz}: not a MedMNIST file, keys {missing} are missing (has {sorted(arrays)})")
    return arrays


def _image_kind(images: np.ndarray, npz: Path) -> tuple[int, int]:
    """(spatial dims, channels) of one split's image array (N, H, W), (N, H, W, 3) or (N, D, H, W)."""
    if images.ndim == 3:
        return 2, 1
    if images.ndim == 4 and images.shape[-1] == 3:
        return 2, 3
    if images.ndim == 4:
        return 3, 1
    raise ManifestError(f"{npz}: images of shape {images.shape[1:]} are neither 2D (grey or RGB) nor 3D grey")


def _write_image(path: Path, image: np.ndarray, dims: int, channels: int) -> None:
    with atomic_path(path, suffix="".join(path.suffixes)) as tmp:
        if channels == 3:
            import SimpleITK as sitk  # here: 90 MB of library that predicting never needs

            sitk.WriteImage(sitk.GetImageFromArray(image, isVector=True), str(tmp), useCompression=False)
        else:
            # (row, column[, ...]) -> NIfTI (x = column, y = row[, z]): the same picture as the ITK view
            nib.save(nib.Nifti1Image(np.ascontiguousarray(image.T), np.eye(4)), str(tmp))


def import_medmnist(npz: Path, out: Path, data_dir: Path, labels: Mapping[int, str] | None = None,
                    limit: int | None = None, progress: bool = True) -> ImportedMedmnist:
    """Write every sample of a MedMNIST file as an image under ``data_dir`` and a manifest at ``out``.

    Args:
        npz: a MedMNIST file (2D grey or RGB, or 3D), with its ``train/val/test`` arrays.
        out: manifest CSV to write; image paths in it are relative to ``data_dir`` (the data root).
        data_dir: folder for the images (``<split>/<case_id>.nii`` or ``.mha``).
        labels: class index -> name; default: MedMNIST's names for known files, else ``class_<k>``.
        limit: keep only the first N samples of each split (tests, demos).
        progress: show a progress bar.

    Raises:
        ManifestError: unreadable file, not MedMNIST, multi-label targets, or labels outside the map.
    """
    npz = Path(npz)
    arrays = _load_arrays(npz)
    name = npz.name.removesuffix(".npz")
    dims, channels = _image_kind(arrays["train_images"], npz)
    values = sorted({int(v) for s in SPLITS for v in np.unique(arrays[f"{s}_labels"])})
    for split in SPLITS:
        y = arrays[f"{split}_labels"]
        if y.ndim == 2 and y.shape[1] > 1:
            raise ManifestError(f"{npz}: {split}_labels has {y.shape[1]} columns: a multi-label set (like "
                                "ChestMNIST), which medseg's single-label classification does not cover")
    names = dict(labels) if labels else KNOWN_LABELS.get(name, {v: f"class_{v}" for v in range(max(values) + 1)})
    outside = sorted(set(values) - set(names))
    if outside:
        raise ManifestError(f"{npz}: labels {outside} are not in the label map {names}; pass --labels with every class")
    suffix = ".mha" if channels == 3 else ".nii"
    data_dir = Path(data_dir)
    jobs: list[tuple[Path, np.ndarray, Case]] = []
    for split in SPLITS:
        images, y = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
        count = len(images) if limit is None else min(limit, len(images))
        for index in range(count):
            case_id = f"{name}_{split}_{index:05d}"
            relative = f"{split}/{case_id}{suffix}"
            jobs.append((data_dir / relative, images[index], Case(case_id, (relative,), str(int(y[index])), split)))

    def write(job: tuple[Path, np.ndarray, Case]) -> Case:
        path, image, case = job
        _write_image(path, image, dims, channels)
        return Case(case.case_id, case.images, case.label, case.split, image_sha256=(sha256_of(path),))

    for split in SPLITS:
        (data_dir / split).mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=4) as pool:
        cases = list(tqdm(pool.map(write, jobs), total=len(jobs), desc=f"import {npz.name}", disable=not progress,
                          unit="image"))
    manifest = Manifest(Path(out), tuple(cases))
    write_manifest(manifest, out)
    write_sidecar(Path(out), ManifestInfo(root=Path(data_dir), task="classification", labels=dict(names),
                                          channels=None, layout="medmnist", class_labels=True))
    size = tuple(int(s) for s in arrays["train_images"].shape[1:1 + dims])
    info = {"source": str(npz), "source_sha256": sha256_of(npz), "labels": {str(k): v for k, v in names.items()},
            "spatial_dims": dims, "channels": channels, "size": list(size)}
    if name in KNOWN_MODALITY:
        info["modality"] = KNOWN_MODALITY[name]
    atomic_write_text(data_dir / "medmnist_import.json", json.dumps(info, indent=2))
    return ImportedMedmnist(manifest, names, dims, channels, size, data_dir)
