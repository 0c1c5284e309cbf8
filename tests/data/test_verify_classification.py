"""verify on classification manifests: the label column is a class index in the label map."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from medseg.data.manifest import Manifest, write_manifest
from medseg.data.medmnist import import_medmnist
from medseg.data.verify import verify_manifest
from tests.conftest import write_medmnist_npz


def _imported(tmp_path: Path) -> Manifest:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", counts=(6, 2, 2))
    return import_medmnist(npz, tmp_path / "m.csv", tmp_path / "images", progress=False).manifest


def test_an_imported_manifest_verifies(tmp_path: Path) -> None:
    manifest = _imported(tmp_path)
    report = verify_manifest(manifest, tmp_path / "images", [0, 1], class_labels=True, spatial_dims=2,
                             expected_channels=1, progress=False)
    assert report.ok, report.summary()


def test_bad_class_labels_name_the_case_and_the_fix(tmp_path: Path) -> None:
    manifest = _imported(tmp_path)
    cases = list(manifest.cases)
    cases[0] = replace(cases[0], label="pneumonia")
    cases[1] = replace(cases[1], label="7")
    cases[2] = replace(cases[2], label=None)  # a training case without a class
    bad = write_manifest(cases, tmp_path / "bad.csv")
    report = verify_manifest(bad, tmp_path / "images", [0, 1], class_labels=True, progress=False)
    by_check = {(f.check, f.case_id) for f in report.errors}
    assert ("label_not_class", cases[0].case_id) in by_check
    assert ("label_values", cases[1].case_id) in by_check
    assert ("missing_label", cases[2].case_id) in by_check
    assert "class 7 is not in the configured label map" in report.summary()


def test_a_3d_image_for_a_2d_model_is_an_error(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "toy3d.npz", shape=(8, 9, 10), counts=(2, 1, 1))
    manifest = import_medmnist(npz, tmp_path / "m.csv", tmp_path / "images", progress=False).manifest
    report = verify_manifest(manifest, tmp_path / "images", [0, 1], class_labels=True, spatial_dims=2, progress=False)
    assert {f.check for f in report.errors} == {"dimensions"}


def test_cross_split_duplicates_can_be_accepted_as_warnings(tmp_path: Path) -> None:
    manifest = _imported(tmp_path)
    cases = list(manifest.cases)
    test_case = next(c for c in cases if c.split == "test")
    train_case = next(c for c in cases if c.split == "train")
    cases[cases.index(test_case)] = replace(test_case, images=train_case.images, image_sha256=train_case.image_sha256)
    dup = write_manifest(cases, tmp_path / "dup.csv")
    strict = verify_manifest(dup, tmp_path / "images", [0, 1], class_labels=True, progress=False)
    assert [f.check for f in strict.errors] == ["leak_duplicate_file"]
    lenient = verify_manifest(dup, tmp_path / "images", [0, 1], class_labels=True, progress=False,
                              cross_split_duplicates="warning")
    assert lenient.ok and [f.check for f in lenient.warnings] == ["leak_duplicate_file"]
