"""Paired multi-contrast data for translation, written in the manifest layout (one file per
contrast, listed as channels of the ``image`` column).

* **Known-answer phantoms**: each single-contrast scan becomes a pair (the scan, and a target made
  from it by :func:`monotone_contrast`, a known monotone intensity map). A perfect translator
  exists (the map, voxel by voxel), and histogram matching is exact when the target's histogram
  is known, so both the network and the baseline are judged against a known answer.
* **Slabs of one study**: a multi-contrast study on one grid (PGBM-001's four MR series) cut into
  slabs of whole slices along one axis, each slab a case (its affine moved to its first slice), so
  some slabs train and others are held out.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.manifest import Case, Manifest, sha256_of, write_manifest
from medseg.io.atomic import atomic_path

#: The target contrast's units: the map's output [0, 1] times this (an arbitrary scanner-like range).
TARGET_SCALE = 1000.0


def monotone_contrast(scaled: np.ndarray) -> np.ndarray:
    """The phantom's contrast map on an image scaled to [0, 1]: smoothstep ``3x² - 2x³``, strictly
    increasing on (0, 1) with f(0) = 0 and f(1) = 1, so min-max scaling commutes with it: the target
    scaled to [0, 1] is exactly ``monotone_contrast`` of the input scaled to [0, 1]."""
    x = np.clip(np.asarray(scaled, dtype=np.float64), 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(nib.Nifti1Image(np.asarray(array, dtype=np.float32), affine), str(tmp))


def write_monotone_phantoms(sources: Sequence[tuple[str, np.ndarray, np.ndarray, str]], root: Path,
                            manifest_path: Path) -> Path:
    """Write each ``(case_id, volume, affine, split)`` as a pair ``<case>_0000`` (the volume) and
    ``<case>_0001`` (its :func:`monotone_contrast` target, times ``TARGET_SCALE``) under ``root``,
    and their manifest (channels: source, target).

    Raises:
        ValueError: a volume with one value everywhere (it has no contrast to map).
    """
    cases = []
    for case_id, volume, affine, split in sources:
        volume = np.asarray(volume, dtype=np.float64)
        low, high = float(volume.min()), float(volume.max())
        if high <= low:
            raise ValueError(f"{case_id}: Expected a scan with contrast, Got one value ({low}) everywhere")
        target = monotone_contrast((volume - low) / (high - low)) * TARGET_SCALE
        names = (f"images/{case_id}_0000.nii.gz", f"images/{case_id}_0001.nii.gz")
        for name, array in zip(names, (volume, target)):
            _save(array, affine, root / name)
        cases.append(Case(case_id, names, None, split, image_sha256=tuple(sha256_of(root / n) for n in names)))
    return write_manifest(Manifest(Path(manifest_path), tuple(cases)), manifest_path)


def slab_affine(affine: np.ndarray, axis: int, start: int) -> np.ndarray:
    """The affine of a slab whose first voxel along ``axis`` is voxel ``start`` of the whole grid."""
    shift = np.eye(4)
    shift[axis, 3] = start
    return np.asarray(affine, dtype=np.float64) @ shift


def write_slabs(case_prefix: str, contrasts: dict[str, np.ndarray], affine: np.ndarray, axis: int, thickness: int,
                splits: Sequence[str], root: Path, manifest_path: Path) -> Path:
    """Cut co-registered contrasts (each (X, Y, Z), one grid) into slabs of ``thickness`` slices along
    ``axis``; slab ``i`` goes to ``splits[i]`` ("" leaves it out). Channels in ``contrasts``' order.

    Raises:
        ValueError: contrasts on different grids, or ``splits`` not one entry per slab.
    """
    shapes = {name: array.shape for name, array in contrasts.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"Expected every contrast on one grid, Got shapes {shapes}")
    slices = next(iter(shapes.values()))[axis]
    if len(splits) != slices // thickness:
        raise ValueError(f"Expected {slices // thickness} splits (one per slab of {thickness} of {slices} slices), "
                         f"Got {len(splits)}")
    cases = []
    for index, split in enumerate(splits):
        if not split:
            continue
        case_id, start = f"{case_prefix}_slab{index:02d}", index * thickness
        keep = [slice(None)] * 3
        keep[axis] = slice(start, start + thickness)
        names = tuple(f"images/{case_id}_{c:04d}.nii.gz" for c in range(len(contrasts)))
        for name, array in zip(names, contrasts.values()):
            _save(array[tuple(keep)], slab_affine(affine, axis, start), root / name)
        cases.append(Case(case_id, names, None, split, image_sha256=tuple(sha256_of(root / n) for n in names)))
    return write_manifest(Manifest(Path(manifest_path), tuple(cases)), manifest_path)


__all__ = ["TARGET_SCALE", "monotone_contrast", "slab_affine", "write_monotone_phantoms", "write_slabs"]
