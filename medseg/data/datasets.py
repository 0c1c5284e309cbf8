"""Datasets from manifests: records for MONAI dictionary transforms, cached per config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import json_hashing
from monai.transforms import Compose

from medseg.config import CacheMode, DataConfig
from medseg.data.manifest import Case, ManifestError


def records(cases: Sequence[Case], root: Path, with_label: bool = True,
            class_labels: bool = False) -> list[dict[str, Any]]:
    """One dict per case for dictionary transforms (several channels -> a list of paths).

    ``class_labels``: the manifest's label column holds a class index (classification), which
    becomes an int; otherwise it is a label-map path.
    """
    out = []
    for case in cases:
        images = [str(p) for p in case.image_paths(root)]
        item: dict[str, Any] = {"image": images[0] if len(images) == 1 else images, "case_id": case.case_id,
                                # content hashes make the disk-cache key change when a file changes in place
                                "sha256": ";".join([*case.image_sha256, case.label_sha256 or ""])}
        if with_label and case.label is not None:
            item["label"] = class_index(case) if class_labels else str(case.label_path(root))
        out.append(item)
    return out


def class_index(case: Case) -> int:
    """The class of a classification case (its label column), checked by ``verify`` beforehand."""
    try:
        return int(str(case.label))
    except ValueError:
        raise ManifestError(f"case {case.case_id}: label {case.label!r} is not a class index; a classification "
                            "manifest's label column holds the class number (0, 1, ...)") from None


def make_dataset(items: list[dict[str, Any]], transform: Compose, cfg: DataConfig, cache_dir: Path,
                 progress: bool = True, workers: int | None = None) -> Dataset:
    """A dataset that caches the deterministic prefix of ``transform`` as configured.

    ``memory`` keeps preprocessed volumes in RAM (MONAI ``CacheDataset``), ``disk`` stores them
    in ``cache_dir`` (``PersistentDataset``, keyed by a hash of each record), ``none`` redoes the work.
    """
    if cfg.cache == CacheMode.MEMORY:
        return CacheDataset(items, transform, cache_rate=1.0, num_workers=workers, progress=progress)
    if cfg.cache == CacheMode.DISK:
        cache_dir.mkdir(parents=True, exist_ok=True)
        # The cache holds MetaTensors whose metadata include NumPy arrays, which weights_only
        # loading rejects (MONAI would then silently recompute every item). The files are
        # written by medseg itself into the run's own cache folder.
        # hash_transform: a cache built under other preprocessing settings is never reused.
        return PersistentDataset(items, transform, cache_dir=cache_dir, track_meta=True, weights_only=False,
                                 hash_transform=json_hashing)
    return Dataset(items, transform)
