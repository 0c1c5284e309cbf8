"""Dataset fingerprint: what ``medseg plan`` knows about a dataset before it chooses anything.

nnU-Net's fingerprint (``nnunetv2/experiment_planning/dataset_fingerprint``) with what a time
budget also needs. Per case: spatial shape, spacing and orientation (as read, and the shape and
spacing once turned to RAS, the orientation medseg trains in), channel count, the size after
cropping to the nonzero region and its ratio to the whole. Per channel: foreground intensity
percentiles (0.5, 50, 99.5), mean, std, min and max over at most 1e7 voxels sampled evenly across
cases with seed 1234 (nnU-Net's numbers). Per class: voxel fraction, how many cases hold it, and
connected-component sizes (count and mm^3) - what tells a planner that a class is rare.

Cases are read in parallel threads (reading and NumPy release the GIL) with a progress bar, and
the result is cached as JSON beside the manifest, keyed by the manifest's content hash and
:data:`FINGERPRINT_VERSION`: a second ``medseg plan`` on the same data reads it back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from medseg.data.manifest import Case, Manifest, file_sha256
from medseg.errors import ManifestError, VolumeReadError
from medseg.io.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: Bump when what is measured changes, so old caches are recomputed.
FINGERPRINT_VERSION = 1
#: nnU-Net samples at most this many foreground voxels over the whole dataset, with this seed.
MAX_INTENSITY_SAMPLES = 10_000_000
SAMPLE_SEED = 1234
#: Largest connected components kept per case and class (the JSON stays small for big label maps).
KEEP_COMPONENTS = 16


@dataclass
class CaseFingerprint:
    """One case as read: ``shape``/``spacing`` in RAS axis order (3D) or as stored (2D)."""

    case_id: str
    split: str
    shape: list[int]
    spacing: list[float]
    orientation: str            # axis codes of the file as stored, e.g. "LPS", "RAS"; "" for 2D images
    channels: int
    cropped_shape: list[int]    # bounding box of the nonzero region (any channel)
    crop_ratio: float           # cropped voxels / all voxels
    label: int | None = None    # classification: the case's class
    class_voxels: dict[str, int] = field(default_factory=dict)             # segmentation: label value -> voxels
    class_components: dict[str, list[float]] = field(default_factory=dict)  # label value -> largest sizes, mm^3


@dataclass
class ChannelStats:
    """Foreground intensity statistics of one input channel (nnU-Net's ``foreground_intensity_properties``)."""

    name: str
    percentile_00_5: float
    median: float
    percentile_99_5: float
    mean: float
    std: float
    min: float
    max: float
    sampled_voxels: int


@dataclass
class ClassStats:
    """One label value (segmentation) or class (classification) over the dataset."""

    value: int
    name: str
    voxel_fraction: float | None   # of all labelled voxels (segmentation)
    cases_with: int                # segmentation: cases holding it; classification: cases of the class
    cases_without: int
    components_per_case: float | None = None   # median over the cases holding it
    component_mm3_median: float | None = None  # median size of a component
    component_mm3_p05: float | None = None     # small components (5th percentile)


@dataclass
class Fingerprint:
    """What ``medseg plan`` measured. :meth:`to_json` / :meth:`from_json` round-trip it."""

    manifest: str
    manifest_sha256: str
    root: str
    task_kind: str                # "segmentation" (label maps) | "classification" (a class per case)
    spatial_dims: int
    channel_names: list[str]
    cases: list[CaseFingerprint]
    channels: list[ChannelStats]
    classes: list[ClassStats]
    elapsed_s: float
    version: int = FINGERPRINT_VERSION

    # -------------------------------------------------------------------------------- summaries

    def training_cases(self, splits: Sequence[str] = ("train", "val")) -> list[CaseFingerprint]:
        """The cases a plan may learn from: never the test split (the planner must not see it)."""
        chosen = [c for c in self.cases if c.split in splits]
        return chosen or [c for c in self.cases if c.split != "test"]

    def median_spacing(self) -> list[float]:
        return [float(v) for v in np.median([c.spacing for c in self.training_cases()], axis=0)]

    def median_shape(self) -> list[float]:
        return [float(v) for v in np.median([c.shape for c in self.training_cases()], axis=0)]

    def median_crop_ratio(self) -> float:
        return float(np.median([c.crop_ratio for c in self.training_cases()]))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Fingerprint:
        raw = json.loads(text)
        raw["cases"] = [CaseFingerprint(**c) for c in raw["cases"]]
        raw["channels"] = [ChannelStats(**c) for c in raw["channels"]]
        raw["classes"] = [ClassStats(**c) for c in raw["classes"]]
        return cls(**raw)

    def case_table(self) -> list[dict[str, Any]]:
        """One flat row per case (the ``mlflow.data`` dataset and the docs' tables)."""
        rows = []
        for c in self.cases:
            row: dict[str, Any] = {"case_id": c.case_id, "split": c.split, "channels": c.channels,
                                   "orientation": c.orientation, "crop_ratio": round(c.crop_ratio, 4)}
            for axis, (size, spacing) in enumerate(zip(c.shape, c.spacing)):
                row[f"size_{axis}"] = size
                row[f"spacing_{axis}"] = round(spacing, 4)
            if c.label is not None:
                row["label"] = c.label
            for value, voxels in c.class_voxels.items():
                row[f"voxels_{value}"] = voxels
            rows.append(row)
        return rows


# ------------------------------------------------------------------------------------ measuring


@dataclass
class _CaseResult:
    fingerprint: CaseFingerprint
    samples: list[np.ndarray]   # per channel, sampled foreground intensities


def _orientation_code(affine: np.ndarray, dims: int) -> str:
    if dims != 3:
        return ""
    import nibabel as nib

    return "".join(nib.orientations.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def _nonzero_box(image: np.ndarray) -> list[int]:
    """Shape of the bounding box of the voxels where any channel is nonzero (nnU-Net's crop)."""
    mask = np.any(image != 0, axis=0)
    if not mask.any():
        return list(mask.shape)
    sizes = []
    for axis in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        hit = np.flatnonzero(mask.any(axis=other))
        sizes.append(int(hit[-1] - hit[0] + 1))
    return sizes


def _components(label: np.ndarray, value: int, voxel_mm3: float) -> list[float]:
    from scipy import ndimage

    labelled, count = ndimage.label(label == value)
    if count == 0:
        return []
    sizes = np.bincount(labelled.ravel())[1:] * voxel_mm3
    return [round(float(s), 3) for s in sorted(sizes, reverse=True)[:KEEP_COMPONENTS]]


def _measure_case(case: Case, root: Path, class_labels: bool, samples_per_case: int, index: int) -> _CaseResult:
    from monai.transforms import Orientation

    from medseg.io.readers import load_volume

    image = load_volume(case.image_paths(root))
    dims = image.ndim - 1
    orientation = _orientation_code(np.asarray(image.affine), dims)
    label = None
    if not class_labels and case.label:
        label = load_volume(case.label_path(root))  # type: ignore[arg-type]
    if dims == 3:  # shapes and spacings in the axis order medseg trains in
        turn = Orientation(axcodes="RAS")
        image = turn(image)  # type: ignore[assignment]
        label = turn(label) if label is not None else None  # type: ignore[assignment]
    array = np.asarray(image.array if hasattr(image, "array") else image, dtype=np.float32)
    spacing = [float(s) for s in np.asarray(image.pixdim)[:dims]]
    box = _nonzero_box(array)
    shape = list(array.shape[1:])
    fp = CaseFingerprint(case_id=case.case_id, split=case.split, shape=shape, spacing=spacing,
                         orientation=orientation, channels=int(array.shape[0]), cropped_shape=box,
                         crop_ratio=float(math.prod(box) / max(1, math.prod(shape))))
    rng = np.random.default_rng(SAMPLE_SEED + index)
    if class_labels:
        fp.label = int(case.label) if case.label not in (None, "") else None
        foreground = np.ones(shape, dtype=bool)
    elif label is not None:
        values = np.rint(np.asarray(label, dtype=np.float32)[0]).astype(np.int64)
        if values.shape != tuple(shape):
            raise VolumeReadError(f"{case.label_path(root)}: label shape {list(values.shape)} does not match the image's "
                                  f"{shape} (case {case.case_id}). Expected the label on the image's grid; resample it "
                                  "or fix the pairing in the manifest.")
        counts = np.bincount(values.ravel().clip(min=0))
        voxel_mm3 = float(math.prod(spacing))
        fp.class_voxels = {str(v): int(n) for v, n in enumerate(counts) if n}
        fp.class_components = {str(v): _components(values, v, voxel_mm3) for v in range(1, len(counts)) if counts[v]}
        foreground = values > 0
    else:
        foreground = np.zeros(shape, dtype=bool)  # an unlabelled case says nothing about foreground intensities
    samples = []
    for channel in array:
        voxels = channel[foreground]
        take = min(samples_per_case, voxels.size)
        samples.append(rng.choice(voxels, take, replace=False) if 0 < take < voxels.size else voxels)
    return _CaseResult(fp, samples)


def _channel_stats(name: str, samples: list[np.ndarray]) -> ChannelStats:
    values = np.concatenate(samples) if samples else np.zeros(0, dtype=np.float32)
    if values.size == 0:
        return ChannelStats(name, *(math.nan,) * 7, sampled_voxels=0)
    values = values.astype(np.float64)
    p_lo, p_med, p_hi = np.percentile(values, [0.5, 50.0, 99.5])
    return ChannelStats(name=name, percentile_00_5=float(p_lo), median=float(p_med), percentile_99_5=float(p_hi),
                        mean=float(values.mean()), std=float(values.std()), min=float(values.min()),
                        max=float(values.max()), sampled_voxels=int(values.size))


def _class_stats(cases: list[CaseFingerprint], labels: Mapping[int, str], class_labels: bool) -> list[ClassStats]:
    out = []
    labelled = [c for c in cases if (c.label is not None if class_labels else bool(c.class_voxels))]
    total = sum(sum(c.class_voxels.values()) for c in labelled)
    values = sorted(set(labels) | ({int(v) for c in labelled for v in c.class_voxels} if not class_labels else
                                   {c.label for c in labelled if c.label is not None}))
    for value in values:
        name = labels.get(value, f"class_{value}")
        if class_labels:
            holding = [c for c in labelled if c.label == value]
            out.append(ClassStats(value, name, None, len(holding), len(labelled) - len(holding)))
            continue
        holding = [c for c in labelled if c.class_voxels.get(str(value), 0) > 0]
        voxels = sum(c.class_voxels.get(str(value), 0) for c in labelled)
        stats = ClassStats(value, name, voxels / total if total else None, len(holding), len(labelled) - len(holding))
        sizes = [s for c in holding for s in c.class_components.get(str(value), [])]
        if value != 0 and sizes:
            stats.components_per_case = float(np.median([len(c.class_components.get(str(value), [])) for c in holding]))
            stats.component_mm3_median = float(np.median(sizes))
            stats.component_mm3_p05 = float(np.percentile(sizes, 5))
        out.append(stats)
    return out


def fingerprint_cache_path(manifest_path: Path) -> Path:
    """``data_manifests/x.csv`` -> ``data_manifests/x.fingerprint.json`` (beside the manifest, which
    is the project's; the data root may be read-only)."""
    return manifest_path.with_name(manifest_path.stem + ".fingerprint.json")


def compute_fingerprint(manifest: Manifest, root: Path, *, channel_names: Sequence[str] | None = None,
                        labels: Mapping[int, str] | None = None, class_labels: bool = False,
                        workers: int | None = None, progress: bool = True, use_cache: bool = True) -> Fingerprint:
    """Measure (or read back from the cache) the fingerprint of a manifest's cases.

    Args:
        manifest: the cases; every split is measured (the test split too, so predict-time checks
            can use it), but planning uses train and val only (:meth:`Fingerprint.training_cases`).
        root: the data root the manifest's paths start from.
        channel_names: names of the input channels (``CT``, ``T2``...): the normalisation rule
            depends on them. Default ``image``, ``image_1``...
        labels: label value -> name.
        class_labels: the manifest's label column is a class index (classification).
        workers: reading threads; default the usable cores.
        progress: show a progress bar.
        use_cache: read ``<manifest>.fingerprint.json`` when it matches the manifest's hash.

    Raises:
        ManifestError: the manifest has no cases outside the test split.
        VolumeReadError: a case cannot be read (the message names the file).
    """
    from tqdm import tqdm

    manifest_path = Path(manifest.path) if manifest.path else None
    digest = file_sha256(manifest_path) if manifest_path and manifest_path.is_file() else ""
    cache = fingerprint_cache_path(manifest_path) if manifest_path else None
    if use_cache and cache is not None and cache.is_file() and digest:
        try:
            cached = Fingerprint.from_json(cache.read_text())
            if cached.version == FINGERPRINT_VERSION and cached.manifest_sha256 == digest \
                    and Path(cached.root).resolve() == Path(root).resolve():
                log.info("fingerprint read from %s (manifest unchanged)", cache)
                names = list(channel_names or [])
                if len(names) == len(cached.channel_names) and names != cached.channel_names:
                    # names are the dataset's description, not a measurement: the caller's win
                    cached.channel_names = names
                    for stats, name in zip(cached.channels, names):
                        stats.name = name
                return cached
        except (ValueError, TypeError, KeyError):
            log.warning("%s: not a fingerprint this medseg reads; measuring again", cache)
    cases = list(manifest.cases)
    if not [c for c in cases if c.split != "test"]:
        raise ManifestError(f"{manifest.path}: every case is in the test split; planning needs train/val cases")
    started = time.perf_counter()
    per_case = max(1, MAX_INTENSITY_SAMPLES // len(cases))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers or cores) as pool:
        jobs = [pool.submit(_measure_case, c, Path(root), class_labels, per_case, i) for i, c in enumerate(cases)]
        results = [job.result() for job in tqdm(jobs, desc="fingerprint", unit="case", disable=not progress)]
    n_channels = results[0].fingerprint.channels
    odd = [r.fingerprint.case_id for r in results if r.fingerprint.channels != n_channels]
    if odd:
        raise VolumeReadError(f"{manifest.path}: cases differ in their channel count. Expected {n_channels} channel(s) "
                              f"(case {results[0].fingerprint.case_id}); got others in {odd[:5]}. Give every case the "
                              "same channels.")
    names = list(channel_names or [])
    if len(names) != n_channels:
        names = names[:n_channels] + [f"image_{i}" if i else "image" for i in range(len(names), n_channels)]
    dims = len(results[0].fingerprint.shape)
    # intensities of the cases a plan may learn from only (the test split stays unseen)
    planning = [r for r in results if r.fingerprint.split != "test"]
    channels = [_channel_stats(names[i], [r.samples[i] for r in planning]) for i in range(n_channels)]
    fps = [r.fingerprint for r in results]
    classes = _class_stats([f for f in fps if f.split != "test"], dict(labels or {}), class_labels)
    fingerprint = Fingerprint(manifest=str(manifest_path or ""), manifest_sha256=digest, root=str(root),
                              task_kind="classification" if class_labels else "segmentation", spatial_dims=dims,
                              channel_names=names, cases=fps, channels=channels, classes=classes,
                              elapsed_s=round(time.perf_counter() - started, 2))
    if cache is not None and digest:
        atomic_write_text(cache, fingerprint.to_json())
    return fingerprint
