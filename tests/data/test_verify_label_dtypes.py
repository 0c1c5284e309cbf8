"""verify on labels stored as floats, 4D multi-channel images and cases missing some classes."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.data.manifest import Case, Manifest
from medseg.data.verify import verify_manifest
from tests.conftest import make_case


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path.name


def _verify(tmp_path: Path, cases: list[Case], **kwargs):  # noqa: ANN202
    return verify_manifest(Manifest(None, tuple(cases)), tmp_path, [0, 1, 2], check_hashes=False, progress=False,
                           workers=1, **kwargs)


def test_float_labels_with_integer_values_pass(tmp_path: Path) -> None:
    image, label, affine = make_case((13, 11, 9), seed=1)
    assert set(np.unique(label)) == {0, 1, 2}
    cases = [Case("a", (_save(tmp_path / "a.nii.gz", image, affine),),
                  _save(tmp_path / "a_label.nii.gz", label.astype(np.float32), affine), "train")]
    report = _verify(tmp_path, cases)
    assert report.ok, report.summary()


def test_non_integer_float_labels_are_an_error(tmp_path: Path) -> None:
    image, label, affine = make_case((13, 11, 9), seed=2)
    smeared = label.astype(np.float32)
    smeared[smeared == 1] = 0.6
    cases = [Case("a", (_save(tmp_path / "a.nii.gz", image, affine),),
                  _save(tmp_path / "a_label.nii.gz", smeared, affine), "train")]
    report = _verify(tmp_path, cases)
    (finding,) = [f for f in report.errors if f.check == "label_not_integer"]
    assert "0.6" in finding.got and "linear interpolation" in finding.message


def test_4d_multichannel_nifti_counts_its_channels(tmp_path: Path) -> None:
    image, label, affine = make_case((13, 11, 9), seed=3)
    four_d = np.stack([image, image * 2 + 1, -image], axis=-1)
    cases = [Case("a", (_save(tmp_path / "a.nii.gz", four_d, affine),),
                  _save(tmp_path / "a_label.nii.gz", label, affine), "train")]
    assert _verify(tmp_path, cases, expected_channels=3).ok
    wrong = _verify(tmp_path, cases, expected_channels=2)
    assert [f.check for f in wrong.errors] == ["channel_count"] and "3 channel(s)" in wrong.errors[0].got


def test_classes_absent_from_some_cases_are_fine(tmp_path: Path) -> None:
    cases = []
    for i, present in enumerate(([0, 1], [0, 2], [0])):
        image, label, affine = make_case((13, 11, 9), seed=10 + i)
        label = np.where(np.isin(label, present), label, 0).astype(np.uint8)
        cases.append(Case(f"c{i}", (_save(tmp_path / f"c{i}.nii.gz", image, affine),),
                          _save(tmp_path / f"c{i}_label.nii.gz", label, affine), "train"))
    report = _verify(tmp_path, cases)
    assert report.ok, report.summary()
    assert [f.check for f in report.warnings] == ["empty_label"]  # only the all-background case is noted
