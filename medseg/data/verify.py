"""Dataset integrity checks, run by ``medseg verify`` and as the first stage of every pipeline.

Each finding names the case, the file(s), what was expected and what was found (nnU-Net's
``verify_dataset_integrity`` style). Errors block a run; warnings are reported and logged.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medseg.data.manifest import Case, Manifest, file_sha256, read_manifest, sha256_of
from medseg.errors import DataVerificationError
from medseg.io.atomic import atomic_write_text
from medseg.io.geometry import Geometry, geometry_of
from medseg.io.readers import VolumeReadError, load_volume


@dataclass(frozen=True)
class Finding:
    severity: str  # "error" | "warning"
    check: str
    case_id: str
    files: list[str]
    expected: str
    got: str
    message: str

    def __str__(self) -> str:
        files = ", ".join(self.files)
        return (
            f"[{self.severity.upper()}] {self.check}: case {self.case_id}: {self.message}\n"
            f"    Expected: {self.expected}\n    Got:      {self.got}\n    Files:    {files}"
        )


@dataclass
class VerifyReport:
    manifest: str
    manifest_sha256: str
    n_cases: int
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_json(self) -> dict[str, Any]:
        return {
            "manifest": self.manifest,
            "manifest_sha256": self.manifest_sha256,
            "n_cases": self.n_cases,
            "ok": self.ok,
            "n_errors": len(self.errors),
            "n_warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
        }

    def write(self, path: Path) -> Path:
        return atomic_write_text(path, json.dumps(self.to_json(), indent=2))

    def summary(self) -> str:
        head = f"verify {self.manifest}: {self.n_cases} cases, {len(self.errors)} error(s), {len(self.warnings)} warning(s)"
        return "\n".join([head, *(str(f) for f in self.findings)])


@dataclass(frozen=True)
class Tolerance:
    spacing: float = 1e-3  # relative
    origin_mm: float = 1e-2
    direction: float = 1e-3


def verify_manifest(
    manifest: Manifest | str | Path,
    root: Path,
    label_values: Sequence[int],
    require_labels_for: Sequence[str] = ("train", "val"),
    tolerance: Tolerance = Tolerance(),
    check_hashes: bool = True,
    progress: bool = True,
    workers: int | None = None,
    expected_channels: int | None = None,
    spatial_dims: int | None = None,
    class_labels: bool = False,
    cross_split_duplicates: str = "error",
    allow_constant: bool = False,
) -> VerifyReport:
    """Check every case of a manifest and the manifest as a whole.

    Args:
        manifest: a manifest or the path of its CSV.
        root: data root the manifest's paths are relative to.
        label_values: allowed label values (the config's label map keys).
        require_labels_for: splits whose cases must have a label.
        tolerance: geometry tolerances between image channels and label.
        check_hashes: compare files with the sha256 recorded in the manifest.
        progress: show a progress bar.
        workers: reader threads (default: the core count).
        expected_channels: input channels the model takes (all image files of a case together).
        spatial_dims: 2 or 3, the model's; images with another number of non-singleton axes are errors.
        class_labels: the label column holds a class index (classification) instead of a label-map path.
        cross_split_duplicates: severity of an identical image file in two splits (``error`` or ``warning``).
        allow_constant: images with one value everywhere are fine (else errors: blank exports).

    Returns:
        The report; ``report.ok`` is False when any error was found.
    """
    if not isinstance(manifest, Manifest):
        manifest = read_manifest(manifest)
    manifest_hash = file_sha256(manifest.path) if manifest.path else ""
    report = VerifyReport(str(manifest.path), manifest_hash, len(manifest.cases))
    report.findings.extend(_cross_case_checks(manifest, cross_split_duplicates))
    allowed = set(int(v) for v in label_values)
    workers = workers or max(1, min(4, os.cpu_count() or 1))

    policy = _Policy(allowed, set(require_labels_for), tolerance, check_hashes, expected_channels, spatial_dims,
                     class_labels, allow_constant)

    def check(case: Case) -> list[Finding]:
        return _check_case(case, root, policy)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = pool.map(check, manifest.cases)
        for findings in tqdm(results, total=len(manifest.cases), desc="verify", disable=not progress, unit="case"):
            report.findings.extend(findings)
    return report


def _cross_case_checks(manifest: Manifest, cross_split_duplicates: str = "error") -> list[Finding]:
    findings: list[Finding] = []
    by_hash: dict[str, list[tuple[Case, str]]] = defaultdict(list)
    for case in manifest.cases:
        for path, digest in zip(case.images, case.image_sha256):
            by_hash[digest].append((case, path))
    for digest, entries in by_hash.items():
        if len(entries) < 2:
            continue
        splits = {_split_key(c) for c, _ in entries}
        ids = [c.case_id for c, _ in entries]
        files = [p for _, p in entries]
        if len(splits) > 1:
            findings.append(
                Finding(cross_split_duplicates, "leak_duplicate_file", ids[0], files, "each file in one split only",
                        f"sha256 {digest[:12]}... in splits {sorted(splits)} (cases {ids})",
                        "the same image file is used in more than one split: held-out results would be inflated. "
                        "Remove the duplicate or rebuild the manifest so both copies share a split (or, to keep an "
                        "official benchmark split as published, set data.cross_split_duplicates: warning).")
            )
        else:
            findings.append(
                Finding("warning", "duplicate_file", ids[0], files, "distinct files",
                        f"sha256 {digest[:12]}... shared by cases {ids}", "the same image file appears twice")
            )
    subject_splits: dict[str, set[str]] = defaultdict(set)
    subject_cases: dict[str, list[str]] = defaultdict(list)
    for case in manifest.cases:
        if case.subject_id:
            subject_splits[case.subject_id].add(_split_key(case))
            subject_cases[case.subject_id].append(case.case_id)
    for subject, splits in subject_splits.items():
        if len(splits) > 1:
            findings.append(
                Finding("error", "leak_subject", subject_cases[subject][0], [], f"subject {subject} in one split",
                        f"in {sorted(splits)} (cases {subject_cases[subject]})",
                        "one subject's cases are in several splits or folds; rebuild the manifest "
                        "(`medseg manifest build` groups splits by subject)")
            )
    return findings


def _split_key(case: Case) -> str:
    """Where a case is used: its fold when folds are set (all folds share split "train"), else its split."""
    return f"fold {case.fold}" if case.fold is not None and case.fold >= 0 else case.split


@dataclass(frozen=True)
class _Policy:
    """What every case is checked against (the config's label map, splits, tolerances and model)."""

    allowed: set[int]
    require_labels_for: set[str]
    tol: Tolerance
    check_hashes: bool
    expected_channels: int | None = None
    spatial_dims: int | None = None
    class_labels: bool = False
    allow_constant: bool = False


def _check_case(case: Case, root: Path, policy: _Policy) -> list[Finding]:
    """Every finding of one case: its files, hashes, images, then its label."""
    out: list[Finding] = []
    images = case.image_paths(root)
    label = None if policy.class_labels else case.label_path(root)

    def add(severity: str, check: str, files: list[str], expected: str, got: str, message: str) -> None:
        out.append(Finding(severity, check, case.case_id, files, expected, got, message))

    missing = [p for p in ([*images, label] if label else images) if not p.exists()]
    for p in missing:
        add("error", "missing_file", [str(p)], "file exists", "not found",
            f"file not found (root {root}); fix the path in the manifest or the data root")
    if missing:
        return out
    if policy.class_labels and case.label is not None:
        _check_class_label(add, case, images, policy.allowed)
    if case.label is None and case.split in policy.require_labels_for:
        add("error", "missing_label", [str(p) for p in images], "a label path", "empty label column",
            f"case in split {case.split!r} has no label; add one or move the case to the test split")
    if policy.check_hashes:
        _check_hashes(add, case, images, label)
    volumes = _read(add, images, "a readable image")
    label_volumes = _read(add, [label], "a readable label") if label is not None else []
    if not volumes:
        return out
    ref_path, ref = volumes[0]
    _check_images(add, images, volumes, policy)
    if label is not None and label_volumes:
        _compare_grids(add, "label_geometry_mismatch", ref_path, geometry_of(ref), label,
                       geometry_of(label_volumes[0][1]), policy.tol)
        _check_label_values(add, label, label_volumes[0][1], policy.allowed)
    return out


def _check_hashes(add: Any, case: Case, images: list[Path], label: Path | None) -> None:
    pairs = list(zip(images, case.image_sha256)) if len(case.image_sha256) == len(images) else []
    if label is not None and case.label_sha256:
        pairs.append((label, case.label_sha256))
    for path, expected in pairs:
        got = sha256_of(path)
        if got != expected:
            add("error", "hash_mismatch", [str(path)], f"sha256 {expected}", f"sha256 {got}",
                "the file changed since the manifest was built; rebuild it with `medseg manifest build` "
                "if the change is intended")


def _read(add: Any, paths: list[Path], expected: str) -> list[tuple[Path, Any]]:
    """The volumes that could be read; each one that could not is a finding."""
    volumes: list[tuple[Path, Any]] = []
    for path in paths:
        try:
            volumes.append((path, load_volume(path)))
        except VolumeReadError as err:
            add("error", "unreadable", [str(path)], expected, type(err.__cause__ or err).__name__, str(err))
    return volumes


def _check_images(add: Any, images: list[Path], volumes: list[tuple[Path, Any]], policy: _Policy) -> None:
    """Channel count and dimensions against the model, finite and varying values, one grid for all channels."""
    ref_path, ref = volumes[0]
    ref_geometry = geometry_of(ref)
    channels = sum(int(vol.shape[0]) for _, vol in volumes)
    expected_channels, spatial_dims = policy.expected_channels, policy.spatial_dims
    if expected_channels is not None and len(volumes) == len(images) and channels != expected_channels:
        add("error", "channel_count", [str(p) for p in images], f"{expected_channels} channel(s) (data.channels)",
            f"{channels} channel(s)", "the case's image files hold a different number of channels than the config "
            "names; list one path per channel in the manifest, or fix data.channels")
    real_dims = sum(int(s) > 1 for s in ref.shape[1:])
    if spatial_dims is not None and real_dims != spatial_dims:
        add("error", "dimensions", [str(ref_path)], f"a {spatial_dims}D image (model.spatial_dims)",
            f"{real_dims}D, spatial shape {tuple(int(s) for s in ref.shape[1:])}",
            "the image does not have the dimensionality the model is configured for")
    for path, vol in volumes:
        data = vol.as_tensor()
        if data.is_floating_point() and not bool(torch.isfinite(data).all()):
            bad = int((~torch.isfinite(data)).sum())
            add("error", "non_finite", [str(path)], "finite intensities", f"{bad} NaN/Inf voxel(s)",
                "image holds NaN or Inf values; fix or exclude the file")
        elif not policy.allow_constant and data.numel() and bool(data.min() == data.max()):
            add("error", "constant_image", [str(path)], "varying intensities", f"every voxel is {float(data.min()):g}",
                "a blank export or an empty mask given as an image; fix or exclude the file (or set "
                "preprocess.allow_constant: true if constant images are expected)")
        if path != ref_path:
            _compare_grids(add, "channel_geometry_mismatch", ref_path, ref_geometry, path, geometry_of(vol), policy.tol)


def _check_label_values(add: Any, label: Path, label_volume: Any, allowed: set[int]) -> None:
    """Finite, integer values, all in the label map; an empty label is a warning."""
    values = torch.unique(label_volume.as_tensor())
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        add("error", "non_finite", [str(label)], "finite label values", "NaN/Inf in the label",
            "the label holds NaN or Inf values; re-export it as an integer label map")
        return
    if values.is_floating_point() and not bool(torch.all(values == torch.round(values))):
        add("error", "label_not_integer", [str(label)], "integer label values",
            f"non-integer values e.g. {values[values != torch.round(values)][:5].tolist()}",
            "labels must be integer class indices; was the label resampled with linear interpolation?")
    present = {int(v) for v in values.tolist()}
    outside = sorted(present - allowed)
    if outside:
        add("error", "label_values", [str(label)], f"values in {sorted(allowed)} (data.labels)",
            f"values {sorted(present)}", f"label values {outside} are not in the configured label map")
    if present <= {0}:
        add("warning", "empty_label", [str(label)], "some foreground voxels", "only background",
            "the label is empty; fine for negative cases, but check it is not a failed export")


def _check_class_label(add: Any, case: Case, images: list[Path], allowed: set[int]) -> None:
    files = [str(p) for p in images]
    try:
        value = int(str(case.label))
    except ValueError:
        add("error", "label_not_class", files, f"a class index in {sorted(allowed)}", repr(case.label),
            "a classification manifest's label column holds the class number (0, 1, ...), not a path or a name")
        return
    if value not in allowed:
        add("error", "label_values", files, f"a class in {sorted(allowed)} (data.labels)", str(value),
            f"class {value} is not in the configured label map; add it to data.labels or fix the manifest")


def _compare_grids(add: Any, check: str, ref_path: Path, ref: Geometry, path: Path, other: Geometry, tol: Tolerance) -> None:
    files = [str(ref_path), str(path)]
    if ref.shape != other.shape:
        add("error", check.replace("geometry", "shape"), files, f"shape {ref.shape}", f"shape {other.shape}",
            "image and label (or channels) have different shapes; resample the label onto the image grid")
        return
    problems = []
    if not np.allclose(ref.spacing, other.spacing, rtol=tol.spacing, atol=0):
        problems.append(("spacing", _fmt(ref.spacing), _fmt(other.spacing)))
    if not np.allclose(ref.origin, other.origin, rtol=0, atol=tol.origin_mm):
        problems.append(("origin", _fmt(ref.origin), _fmt(other.origin)))
    if not np.allclose(ref.direction, other.direction, rtol=0, atol=tol.direction):
        problems.append(("direction", _fmt(ref.direction.ravel()), _fmt(other.direction.ravel())))
    for what, expected, got in problems:
        add("error", check, files, f"{what} {expected}", f"{what} {got}",
            f"{what} differs between {Path(files[0]).name} and {Path(files[1]).name}; the files are not in the "
            "same space: resample one onto the other (e.g. SimpleITK Resample) or fix the header")


def _fmt(values: Any) -> str:
    return "(" + ", ".join(f"{float(v):.4g}" for v in np.asarray(values).ravel()) + ")"


@dataclass(frozen=True)
class VerifyOutputs:
    report_path: Path
    report: VerifyReport


@dataclass(frozen=True)
class VerifyOptions:
    """How a task's data are checked (its ``Task.verify_options`` makes these from a config).

    Attributes:
        labels: allowed label values; None: not checked (no label map given).
        require_labels_for: splits whose cases must have a label.
        expected_channels: input channels the model takes; None: not checked.
        spatial_dims: 2 or 3, the model's; None: not checked (reconstruction takes slices of volumes).
        class_labels: the label column holds a class index (classification), not a label-map path.
        cross_split_duplicates: severity of an identical image file in two splits.
        allow_constant: images with one value everywhere are not errors (``preprocess.allow_constant``).
    """

    labels: Sequence[int] | None = None
    require_labels_for: tuple[str, ...] = ("train", "val")
    expected_channels: int | None = None
    spatial_dims: int | None = None
    class_labels: bool = False
    cross_split_duplicates: str = "error"
    allow_constant: bool = False

    def check(self, manifest: Manifest | str | Path, root: Path, progress: bool = True) -> VerifyReport:
        """:func:`verify_manifest` with these options."""
        return verify_manifest(manifest, root, self.labels if self.labels is not None else range(2**16),
                               require_labels_for=self.require_labels_for, progress=progress,
                               expected_channels=self.expected_channels, spatial_dims=self.spatial_dims,
                               class_labels=self.class_labels, cross_split_duplicates=self.cross_split_duplicates,
                               allow_constant=self.allow_constant)


def verify_run_data(options: VerifyOptions, manifest_path: Path, root: Path, out_dir: Path, tracker: Any,
                    progress: bool = True) -> VerifyOutputs:
    """The verify stage of a run: check the manifest as the task will use it, write
    ``verify_report.json``, log it to MLflow, and stop the run (``DataVerificationError``) if it
    found errors."""
    report = options.check(manifest_path, root, progress)
    verified = VerifyOutputs(report.write(out_dir / "verify_report.json"), report)
    tracker.log_artifact(verified.report_path)
    if not verified.report.ok:
        raise DataVerificationError(verified.report, verified.report_path)
    return verified
