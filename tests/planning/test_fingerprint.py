"""The fingerprint on tiny volumes whose statistics are known by construction."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.manifest import Case, Manifest, write_manifest
from medseg.planning.fingerprint import Fingerprint, compute_fingerprint, fingerprint_cache_path

# LPS-stored volumes (x flipped, y flipped), anisotropic spacing 0.8 x 1.5 x 4.0 mm
LPS_AFFINE = np.diag([-0.8, -1.5, 4.0, 1.0])


def _write_case(root: Path, name: str, shape: tuple[int, int, int], fg_value: float, blobs: list[tuple[slice, ...]],
                rare: tuple[slice, ...] | None = None) -> tuple[str, str]:
    """A zero border of 2 voxels, 100 inside, ``fg_value`` under the label; class 1 in ``blobs``."""
    image = np.zeros(shape, dtype=np.float32)
    image[2:-2, 2:-2, 2:-2] = 100.0
    label = np.zeros(shape, dtype=np.uint8)
    for blob in blobs:
        label[blob] = 1
    if rare is not None:
        label[rare] = 2
    image[label > 0] = fg_value
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, LPS_AFFINE), root / "images" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label, LPS_AFFINE), root / "labels" / f"{name}.nii.gz")
    return f"images/{name}.nii.gz", f"labels/{name}.nii.gz"


@pytest.fixture
def known_dataset(tmp_path: Path) -> tuple[Manifest, Path]:
    root = tmp_path / "data"
    shape = (11, 13, 7)
    cases = []
    # case a: two separate class-1 blobs of 2x2x2 and 3x3x1 voxels, foreground value 10
    image, label = _write_case(root, "a", shape, 10.0, [np.s_[3:5, 3:5, 3:5], np.s_[6:9, 8:11, 4:5]])
    cases.append(Case("a", (image,), label, "train"))
    # case b: one 2x2x2 blob of class 1 and one voxel of class 2 (rare; absent from case a), value 20
    image, label = _write_case(root, "b", shape, 20.0, [np.s_[3:5, 3:5, 3:5]], rare=np.s_[8, 8, 4])
    cases.append(Case("b", (image,), label, "val"))
    # case c: the test split, value 1000 -- it must not reach the intensity statistics
    image, label = _write_case(root, "c", shape, 1000.0, [np.s_[3:5, 3:5, 3:5]])
    cases.append(Case("c", (image,), label, "test"))
    manifest_path = tmp_path / "cases.csv"
    write_manifest(cases, manifest_path)
    from medseg.data.manifest import read_manifest

    return read_manifest(manifest_path), root


def test_per_case_geometry_is_in_ras_order_with_the_stored_orientation(known_dataset: tuple[Manifest, Path]) -> None:
    manifest, root = known_dataset
    fp = compute_fingerprint(manifest, root, channel_names=["MRI"], labels={0: "bg", 1: "blob", 2: "dot"},
                             progress=False)
    first = fp.cases[0]
    assert first.orientation == "LPS"
    assert first.shape == [11, 13, 7] and first.spacing == pytest.approx([0.8, 1.5, 4.0])
    assert first.channels == 1
    assert first.cropped_shape == [7, 9, 3]  # the 2-voxel zero border is cropped away
    assert first.crop_ratio == pytest.approx(7 * 9 * 3 / (11 * 13 * 7))
    assert fp.spatial_dims == 3 and fp.median_spacing() == pytest.approx([0.8, 1.5, 4.0])


def test_intensities_come_from_foreground_of_train_and_val_only(known_dataset: tuple[Manifest, Path]) -> None:
    manifest, root = known_dataset
    fp = compute_fingerprint(manifest, root, channel_names=["CT"], labels={0: "bg", 1: "blob", 2: "dot"},
                             progress=False)
    stats = fp.channels[0]
    # foreground voxels: case a 8 + 9 = 17 at 10, case b 8 + 1 = 9 at 20; case c (test, 1000) is left out
    values = np.array([10.0] * 17 + [20.0] * 9)
    assert stats.name == "CT" and stats.sampled_voxels == 26
    assert stats.mean == pytest.approx(values.mean()) and stats.std == pytest.approx(values.std())
    assert stats.max == 20.0 and stats.min == 10.0
    assert stats.percentile_00_5 == pytest.approx(np.percentile(values, 0.5))
    assert stats.percentile_99_5 == pytest.approx(np.percentile(values, 99.5))


def test_class_fractions_presence_and_component_sizes(known_dataset: tuple[Manifest, Path]) -> None:
    manifest, root = known_dataset
    fp = compute_fingerprint(manifest, root, labels={0: "bg", 1: "blob", 2: "dot"}, progress=False)
    voxel_mm3 = 0.8 * 1.5 * 4.0
    a = next(c for c in fp.cases if c.case_id == "a")
    assert a.class_voxels == {"0": 11 * 13 * 7 - 17, "1": 17}
    assert a.class_components["1"] == pytest.approx([9 * voxel_mm3, 8 * voxel_mm3])
    by_value = {c.value: c for c in fp.classes}
    total = 2 * 11 * 13 * 7  # train + val voxels
    assert by_value[1].voxel_fraction == pytest.approx(25 / total)
    assert by_value[2].voxel_fraction == pytest.approx(1 / total)
    assert (by_value[2].cases_with, by_value[2].cases_without) == (1, 1)  # absent from case a: fine
    assert by_value[1].components_per_case == 1.5  # median of 2 (case a) and 1 (case b)
    assert by_value[2].component_mm3_median == pytest.approx(voxel_mm3)


def test_the_cache_is_reused_until_the_manifest_changes(known_dataset: tuple[Manifest, Path]) -> None:
    manifest, root = known_dataset
    first = compute_fingerprint(manifest, root, progress=False)
    cache = fingerprint_cache_path(Path(manifest.path))
    assert cache.is_file() and Fingerprint.from_json(cache.read_text()) == first
    raw = json.loads(cache.read_text())
    raw["elapsed_s"] = 123.0  # a marker: a cache hit returns it
    cache.write_text(json.dumps(raw))
    assert compute_fingerprint(manifest, root, progress=False).elapsed_s == 123.0
    Path(manifest.path).write_text(Path(manifest.path).read_text().replace(",val,", ",train,"))
    from medseg.data.manifest import read_manifest

    again = compute_fingerprint(read_manifest(manifest.path), root, progress=False)
    assert again.elapsed_s != 123.0 and {c.split for c in again.cases} == {"train", "test"}


def test_a_label_on_another_grid_is_named(known_dataset: tuple[Manifest, Path]) -> None:
    manifest, root = known_dataset
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.uint8), LPS_AFFINE), root / "labels" / "b.nii.gz")
    from medseg.errors import VolumeReadError

    with pytest.raises(VolumeReadError, match=r"b\.nii\.gz: label shape \[5, 5, 5\] does not match the image's"):
        compute_fingerprint(manifest, root, progress=False, use_cache=False)


def test_classification_fingerprint_counts_cases_per_class(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    cases = []
    for i in range(6):
        image = np.full((9, 7), float(i), dtype=np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / f"{i}.nii")
        cases.append(Case(f"c{i}", (f"{i}.nii",), str(i % 2 if i < 4 else 1), "train" if i < 4 else "val"))
    write_manifest(cases, tmp_path / "cls.csv")
    from medseg.data.manifest import read_manifest

    fp = compute_fingerprint(read_manifest(tmp_path / "cls.csv"), root, labels={0: "no", 1: "yes"},
                             class_labels=True, progress=False)
    assert fp.task_kind == "classification" and fp.spatial_dims == 2
    assert [(c.value, c.cases_with) for c in fp.classes] == [(0, 2), (1, 4)]
    assert fp.channels[0].min == 0.0 and fp.channels[0].max == 5.0  # every pixel counts in classification


def test_a_cached_fingerprint_takes_the_callers_channel_names(known_dataset: tuple[Manifest, Path]) -> None:
    manifest, root = known_dataset
    compute_fingerprint(manifest, root, channel_names=["image"], progress=False)
    again = compute_fingerprint(manifest, root, channel_names=["CT"], progress=False)
    assert again.channel_names == ["CT"] and again.channels[0].name == "CT"
