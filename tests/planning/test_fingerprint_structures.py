"""Fingerprint fields for nested and small structures (shells, co-occurrence, image fraction,
component sizes), on tiny nested volumes whose answers are counted by hand."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.manifest import Case, Manifest, read_manifest, write_manifest
from medseg.planning import fingerprint as fingerprint_module
from medseg.planning import rules
from medseg.planning.fingerprint import (
    FINGERPRINT_VERSION,
    Fingerprint,
    compute_fingerprint,
    fingerprint_cache_path,
)

REPO = Path(__file__).resolve().parents[2]
LPS_AFFINE = np.diag([-0.8, -1.5, 4.0, 1.0])
VOXEL_MM3 = 0.8 * 1.5 * 4.0
SHAPE = (9, 10, 8)
LABELS = {0: "background", 1: "outer", 2: "cube", 3: "shell"}


def _write(root: Path, name: str, label: np.ndarray) -> tuple[str, str]:
    image = np.zeros(label.shape, dtype=np.float32)
    image[1:-1, 1:-1, 1:-1] = 100.0  # nonzero box 7 x 8 x 6 = 336 voxels: the cropped image
    for folder in ("images", "labels"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, LPS_AFFINE), root / "images" / f"{name}.nii.gz")
    nib.save(nib.Nifti1Image(label.astype(np.uint8), LPS_AFFINE), root / "labels" / f"{name}.nii.gz")
    return f"images/{name}.nii.gz", f"labels/{name}.nii.gz"


def _nested(with_cube: bool) -> np.ndarray:
    """Class 1 (7 x 8 x 6) holding class 3 (5 x 6 x 4), holding, when asked, a cube of 2 (3 x 4 x 2)."""
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[1:8, 1:9, 1:7] = 1
    label[2:7, 2:8, 2:6] = 3
    if with_cube:
        label[3:6, 3:7, 3:5] = 2
    return label


@pytest.fixture
def nested(tmp_path: Path) -> tuple[Manifest, Path]:
    root = tmp_path / "data"
    test_label = np.zeros(SHAPE, dtype=np.uint8)
    test_label[2:4, 2:4, 2:4] = 2  # the test split: class 2 touching nothing but background
    cases = []
    for name, label, split in (("a", _nested(True), "train"), ("b", _nested(False), "val"), ("c", test_label, "test")):
        image, label_path = _write(root, name, label)
        cases.append(Case(name, (image,), label_path, split))
    write_manifest(cases, tmp_path / "nested.csv")
    return read_manifest(tmp_path / "nested.csv"), root


def test_per_case_shells_components_and_counts(nested: tuple[Manifest, Path]) -> None:
    manifest, root = nested
    fp = compute_fingerprint(manifest, root, labels=LABELS, progress=False)
    a = next(c for c in fp.cases if c.case_id == "a")
    # class 1's shell: the image's 1-voxel border (9*10*8 - 336 = 384, background) and the whole
    # 1-voxel-thick class-3 layer inside it (120 - 24 = 96); class 3's: 336 - 120 = 216 of class 1
    # outside and all 24 voxels of the cube (2 voxels thick, so every one touches the layer)
    assert a.class_shell == {"1": {"0": 384, "3": 96}, "2": {"3": 96}, "3": {"1": 216, "2": 24}}
    assert a.class_component_voxels == {"1": [216], "2": [24], "3": [96]}
    assert a.class_component_count == {"1": 1, "2": 1, "3": 1}
    assert a.class_components["2"] == pytest.approx([24 * VOXEL_MM3])


def test_class_shells_are_voxel_weighted_over_training_cases(nested: tuple[Manifest, Path]) -> None:
    manifest, root = nested
    fp = compute_fingerprint(manifest, root, labels=LABELS, progress=False)
    by_value = {c.value: c for c in fp.classes}
    assert by_value[1].shell == {"0": pytest.approx(0.8), "3": pytest.approx(0.2)}
    assert by_value[1].shell_voxels == 960
    # case b has no cube: its class 3 is solid, all 216 shell voxels class 1 (the test case adds nothing)
    assert by_value[3].shell == {"1": pytest.approx(432 / 456, abs=1e-6), "2": pytest.approx(24 / 456, abs=1e-6)}
    assert by_value[2].shell == {"3": 1.0} and by_value[2].shell_voxels == 96
    assert by_value[0].shell is None and by_value[0].co_occurrence is None
    assert fp.shell_fractions()[2] == {3: 1.0}
    assert rules.containment_tree(fp.shell_fractions()) == {1: None, 2: 3, 3: 1}
    assert rules.regions_from_tree(rules.containment_tree(fp.shell_fractions()), LABELS) == [
        ("outer_shell_cube", [1, 2, 3]), ("shell_cube", [2, 3]), ("cube", [2])]


def test_co_occurrence_image_fraction_and_component_sizes(nested: tuple[Manifest, Path]) -> None:
    manifest, root = nested
    fp = compute_fingerprint(manifest, root, labels=LABELS, progress=False)
    by_value = {c.value: c for c in fp.classes}
    assert by_value[1].co_occurrence == {"2": 0.5, "3": 1.0}
    assert by_value[2].co_occurrence == {"1": 0.5, "3": 0.5}
    cropped = 2 * 336
    assert fp.image_fractions() == pytest.approx({1: 432 / cropped, 2: 24 / cropped, 3: 216 / cropped})
    shell = by_value[3]  # one component per case: 96 voxels (hollow, case a) and 120 (solid, case b)
    assert (shell.components_per_case, shell.component_voxels_min, shell.component_voxels_median) == (1.0, 96, 108.0)
    assert shell.component_voxels_p05 == pytest.approx(np.percentile([96, 120], 5))
    assert shell.component_mm3_min == pytest.approx(96 * VOXEL_MM3)
    assert shell.component_mm3_median == pytest.approx(108 * VOXEL_MM3)
    assert fp.component_voxels(3) == [96, 120] and fp.component_voxels(2) == [24]
    assert rules.rare_against_image(fp.image_fractions(), {c.value: c.component_voxels_median for c in fp.classes
                                                           if c.component_voxels_median is not None}).keys() == {1, 2, 3}


def test_many_specks_keep_their_count_and_spread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprint_module, "KEEP_COMPONENT_SIZES", 3)
    label = np.zeros(SHAPE, dtype=np.uint8)
    for i, size in enumerate([5, 1, 4, 2, 3]):  # five straight specks, two voxels apart
        label[1 + 2 * (i % 4), 1:1 + size, 4 - 2 * (i // 4)] = 4
    root = tmp_path / "data"
    image, path = _write(root, "s", label)
    write_manifest([Case("s", (image,), path, "train")], tmp_path / "specks.csv")
    fp = compute_fingerprint(read_manifest(tmp_path / "specks.csv"), root, progress=False)
    case = fp.cases[0]
    assert case.class_component_count == {"4": 5}
    assert case.class_component_voxels == {"4": [1, 3, 5]}  # smallest, middle, largest
    speck = next(c for c in fp.classes if c.value == 4)
    assert speck.components_per_case == 5.0 and speck.component_voxels_min == 1
    assert rules.min_component_size_candidates(fp.component_voxels(4)) == [0]


def test_a_version_1_cache_is_read_and_measured_again(nested: tuple[Manifest, Path]) -> None:
    manifest, root = nested
    compute_fingerprint(manifest, root, progress=False)
    cache = fingerprint_cache_path(Path(manifest.path))
    raw = json.loads(cache.read_text())
    raw["version"], raw["elapsed_s"] = 1, 123.0
    for case in raw["cases"]:
        for key in ("class_component_count", "class_component_voxels", "class_shell"):
            del case[key]
    for stats in raw["classes"]:
        for key in ("component_mm3_min", "component_voxels_median", "component_voxels_p05", "component_voxels_min",
                    "image_fraction", "shell", "shell_voxels", "co_occurrence"):
            del stats[key]
    cache.write_text(json.dumps(raw))
    old = Fingerprint.from_json(cache.read_text())
    assert old.version == 1 and old.cases[0].class_shell == {} and old.shell_fractions() == {}
    again = compute_fingerprint(manifest, root, progress=False)
    assert again.version == FINGERPRINT_VERSION == 2 and again.elapsed_s != 123.0
    assert again.shell_fractions()[2] == {3: 1.0}


@pytest.mark.parametrize("path", sorted((REPO / "data_manifests").glob("*.fingerprint.json")), ids=lambda p: p.name)
def test_committed_fingerprints_still_read(path: Path) -> None:
    fp = Fingerprint.from_json(path.read_text())
    assert fp.cases and fp.classes
    assert fp.shell_fractions() == {} or fp.version >= 2
