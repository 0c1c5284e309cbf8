"""Dataset fingerprint: what ``medseg plan`` knows about a dataset before it chooses anything.

nnU-Net's fingerprint (``nnunetv2/experiment_planning/dataset_fingerprint``) with what a time
budget also needs. Per case: spatial shape, spacing and orientation (as read, and the shape and
spacing once turned to RAS, the orientation medseg trains in), channel count, the size after
cropping to the nonzero region and its ratio to the whole. Per channel: foreground intensity
percentiles (0.5, 50, 99.5), mean, std, min and max over at most 1e7 voxels sampled evenly across
cases with seed 1234 (nnU-Net's numbers). Per class: voxel fraction, how many cases hold it, and
connected-component sizes (count, voxels and mm^3) - what tells a planner that a class is rare -,
its share of the cropped image, how often it appears together with each other class, and what
surrounds it: the make-up of its outer shell (see :func:`class_shells`), from which
:func:`medseg.planning.rules.containment_tree` finds nested structures (BraTS' enhancing tumour
inside the tumour core inside the whole tumour) for nnU-Net's region-based training.

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

#: Bump when what is measured changes, so old caches are recomputed (2: component voxels and
#: counts, shells, co-occurrence, image fraction). Older files still read, new fields empty.
FINGERPRINT_VERSION = 2
#: nnU-Net samples at most this many foreground voxels over the whole dataset, with this seed.
MAX_INTENSITY_SAMPLES = 10_000_000
SAMPLE_SEED = 1234
#: Largest connected components kept per case and class (the JSON stays small for big label maps).
KEEP_COMPONENTS = 16
#: At most this many component sizes (voxels) kept per case and class: evenly spaced order statistics,
#: smallest and largest included, so percentiles stay right for label maps with thousands of specks.
KEEP_COMPONENT_SIZES = 256


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
    # version 2 (older caches read them as empty):
    class_component_count: dict[str, int] = field(default_factory=dict)        # label value -> components
    class_component_voxels: dict[str, list[int]] = field(default_factory=dict)  # label value -> sizes, ascending
    class_shell: dict[str, dict[str, int]] = field(default_factory=dict)      # value -> neighbour value -> voxels


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
    # version 2 (None in older caches):
    component_mm3_min: float | None = None
    component_voxels_median: float | None = None
    component_voxels_p05: float | None = None
    component_voxels_min: int | None = None
    image_fraction: float | None = None        # of the cropped images' voxels, over all labelled cases
    shell: dict[str, float] | None = None      # neighbour value ("0" background) -> share of the outer shell
    shell_voxels: int | None = None            # the shell's voxels, summed over cases (the share's weight)
    co_occurrence: dict[str, float] | None = None  # other foreground value -> share of labelled cases with both


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

    def shell_fractions(self) -> dict[int, dict[int, float]]:
        """Foreground value -> neighbour value -> share of its outer shell, the input of
        :func:`medseg.planning.rules.containment_tree` (empty for a version-1 cache)."""
        return {c.value: {int(k): v for k, v in c.shell.items()} for c in self.classes
                if c.value != 0 and c.shell is not None}

    def image_fractions(self) -> dict[int, float]:
        """Foreground value -> share of the cropped images' voxels (:func:`rules.rare_against_image`)."""
        return {c.value: c.image_fraction for c in self.classes if c.value != 0 and c.image_fraction is not None}

    def component_voxels(self, value: int) -> list[int]:
        """Sizes in voxels of the components of class ``value`` over the training cases (kept
        order statistics when a case has more than :data:`KEEP_COMPONENT_SIZES`)."""
        return sorted(s for c in self.training_cases() for s in c.class_component_voxels.get(str(value), []))

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


def class_shells(values: np.ndarray) -> dict[int, dict[int, int]]:
    """What surrounds each foreground class: the voxels of its outer shell, by the value they hold.

    The shell of class B is a one-voxel dilation of B with the full 3x3(x3) structure (faces,
    edges and corners) minus B itself, cut at the image border. A necrotic core inside an
    enhancing rim has a shell of rim only; the rim's shell is edema outside and the core inside.

    Args:
        values: an integer label map (2D or 3D); values <= 0 are not measured (background).

    Returns:
        Foreground value -> neighbour value -> shell voxels; classes absent from ``values`` are left out.
    """
    from scipy import ndimage

    structure = np.ones((3,) * values.ndim, dtype=bool)
    shells: dict[int, dict[int, int]] = {}
    for value, box in enumerate(ndimage.find_objects(values), start=1):
        if box is None:
            continue
        # the shell lies within one voxel of the class's bounding box: dilate that window only
        grown = tuple(slice(max(0, s.start - 1), min(n, s.stop + 1)) for s, n in zip(box, values.shape))
        window = values[grown]
        inside = window == value
        shell = ndimage.binary_dilation(inside, structure) & ~inside
        counts = np.bincount(window[shell].clip(min=0))
        shells[value] = {v: int(n) for v, n in enumerate(counts) if n}
    return shells


def _component_voxels(values: np.ndarray, value: int, box: tuple[slice, ...]) -> np.ndarray:
    """Sizes in voxels of the face-connected components of ``value``, ascending."""
    from scipy import ndimage

    labelled, count = ndimage.label(values[box] == value)
    return np.sort(np.bincount(labelled.ravel())[1:]) if count else np.zeros(0, dtype=np.int64)


def _kept_sizes(sizes: np.ndarray) -> list[int]:
    if sizes.size > KEEP_COMPONENT_SIZES:  # evenly spaced order statistics keep the distribution's shape
        sizes = sizes[np.linspace(0, sizes.size - 1, KEEP_COMPONENT_SIZES).round().astype(int)]
    return [int(s) for s in sizes]


def _measure_classes(fp: CaseFingerprint, values: np.ndarray, voxel_mm3: float) -> None:
    """Fill a case's per-class voxels, components and shells from its label map."""
    from scipy import ndimage

    counts = np.bincount(values.ravel().clip(min=0))
    fp.class_voxels = {str(v): int(n) for v, n in enumerate(counts) if n}
    for value, box in enumerate(ndimage.find_objects(values.clip(min=0)), start=1):
        if box is None:
            continue
        sizes = _component_voxels(values, value, box)
        key = str(value)
        fp.class_components[key] = [round(float(s) * voxel_mm3, 3) for s in sizes[::-1][:KEEP_COMPONENTS]]
        fp.class_component_count[key] = int(sizes.size)
        fp.class_component_voxels[key] = _kept_sizes(sizes)
    fp.class_shell = {str(v): {str(k): n for k, n in shell.items()} for v, shell in class_shells(values).items()}


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
        _measure_classes(fp, values, float(math.prod(spacing)))
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
    cropped = sum(math.prod(c.cropped_shape) for c in labelled)
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
        if value != 0:
            stats.image_fraction = voxels / cropped if cropped else None
            _add_components(stats, holding)
            _add_shell(stats, holding)
            stats.co_occurrence = {str(other): round(_both(labelled, value, other), 6)
                                   for other in values if other not in (0, value)} if labelled else None
        out.append(stats)
    return out


def _both(cases: list[CaseFingerprint], a: int, b: int) -> float:
    """Share of ``cases`` holding both classes."""
    return sum(1 for c in cases if c.class_voxels.get(str(a)) and c.class_voxels.get(str(b))) / len(cases)


def _add_components(stats: ClassStats, holding: list[CaseFingerprint]) -> None:
    """Component counts and sizes of one class over the cases holding it (voxels, and mm^3 with each
    case's own voxel volume, since spacings differ between cases). Percentiles pool the components
    of all cases, so a case with many specks weighs in with each of them."""
    key = str(stats.value)
    voxels = [s for c in holding for s in c.class_component_voxels.get(key, [])]
    mm3 = [s * math.prod(c.spacing) for c in holding for s in c.class_component_voxels.get(key, [])]
    counts = [c.class_component_count.get(key, 0) for c in holding]
    if not voxels:
        return
    stats.components_per_case = float(np.median(counts))
    stats.component_mm3_median = float(np.median(mm3))
    stats.component_mm3_p05 = float(np.percentile(mm3, 5))
    stats.component_mm3_min = float(min(mm3))
    stats.component_voxels_median = float(np.median(voxels))
    stats.component_voxels_p05 = float(np.percentile(voxels, 5))
    stats.component_voxels_min = int(min(voxels))


def _add_shell(stats: ClassStats, holding: list[CaseFingerprint]) -> None:
    """The class's outer-shell make-up over the cases, weighted by voxels (a big tumour's shell
    counts more than a speck's)."""
    summed: dict[str, int] = {}
    for case in holding:
        for neighbour, n in case.class_shell.get(str(stats.value), {}).items():
            summed[neighbour] = summed.get(neighbour, 0) + n
    shell_voxels = sum(summed.values())
    if shell_voxels:
        stats.shell_voxels = shell_voxels
        stats.shell = {k: round(n / shell_voxels, 6) for k, n in sorted(summed.items(), key=lambda kv: int(kv[0]))}


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
