"""Regression targets from a CSV: every bad cell is refused with its file, line, case and column,
what was expected, what was found and the fix; structure volumes are measured in mL from the header."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.manifest import Case, read_manifest, write_manifest
from medseg.data.targets import read_targets, structure_volumes_ml, write_structure_volumes
from medseg.errors import ManifestError


def _csv(tmp_path: Path, text: str, name: str = "targets.csv") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_targets_are_read_by_case_in_the_configured_column_order(tmp_path: Path) -> None:
    path = _csv(tmp_path, "case_id,posterior_ml,anterior_ml,note\nc1,1.5,2.25,x\nc2, 1e-1 ,-3,\n")
    table = read_targets(path, ["anterior_ml", "posterior_ml"])
    assert table.columns == ("anterior_ml", "posterior_ml")
    np.testing.assert_array_equal(table.array(["c2", "c1"]), [[-3.0, 0.1], [2.25, 1.5]])


@pytest.mark.parametrize(("cell", "what", "got"), [
    ("", "the target is missing", "an empty cell"),
    ("nan", "the target is not finite", "'nan'"),
    ("-inf", "the target is not finite", "'-inf'"),
    ("3,5 mL", "the target is not a number", "'3,5 mL'"),
    ("large", "the target is not a number", "'large'"),
])
def test_a_bad_cell_names_file_line_case_column_expected_got_and_fix(tmp_path: Path, cell: str, what: str,
                                                                     got: str) -> None:
    path = _csv(tmp_path, f'case_id,volume_ml\nc1,2.0\nc2,"{cell}"\n')
    with pytest.raises(ManifestError) as caught:
        read_targets(path, ["volume_ml"])
    message = str(caught.value)
    assert f"line 3, case 'c2', column 'volume_ml': {what}" in message
    assert "Expected: a finite number" in message and f"Got:      {got}" in message
    assert f"File:     {path}" in message and "Fix:" in message


def test_a_missing_column_suggests_the_closest_and_a_missing_case_is_named(tmp_path: Path) -> None:
    path = _csv(tmp_path, "case_id,volume_ml\nc1,2.0\nc2,3.0\n")
    with pytest.raises(ManifestError, match=r"no target column 'volume_mL'(.|\n)*did you mean 'volume_ml'\?"):
        read_targets(path, ["volume_mL"])
    with pytest.raises(ManifestError, match=r"1 case\(s\) have no targets(.|\n)*Got:      no row for 'c3'"):
        read_targets(path, ["volume_ml"]).array(["c1", "c3"])
    with pytest.raises(ManifestError, match=r"no case_id column(.|\n)*File:     .*ids.csv"):
        read_targets(_csv(tmp_path, "id,volume_ml\nc1,2\n", "ids.csv"), ["volume_ml"])
    with pytest.raises(ManifestError, match="case 'c1' is listed twice"):
        read_targets(_csv(tmp_path, "case_id,volume_ml\nc1,2\nc1,3\n", "twice.csv"), ["volume_ml"])
    with pytest.raises(ManifestError, match=r"the targets file does not exist(.|\n)*File:     .*absent.csv"):
        read_targets(tmp_path / "absent.csv", ["volume_ml"])


def test_a_manifest_may_carry_target_columns_and_still_refuses_other_extras(tmp_path: Path) -> None:
    manifest = _csv(tmp_path, "case_id,image,split,target,target_grade\nc1,a.nii.gz,train,1.5,2\n", "m.csv")
    assert read_manifest(manifest).cases[0].case_id == "c1"
    np.testing.assert_array_equal(read_targets(manifest, ["target", "target_grade"]).array(["c1"]), [[1.5, 2.0]])
    with pytest.raises(ManifestError, match=r"unknown column\(s\) \['weight'\]"):
        read_manifest(_csv(tmp_path, "case_id,image,split,weight\nc1,a.nii.gz,train,3\n", "w.csv"))


def test_structure_volumes_use_the_voxel_volume_of_an_oblique_anisotropic_header(tmp_path: Path) -> None:
    labels = np.zeros((9, 7, 5), dtype=np.uint8)
    labels[1:4, 2:5, 1:3] = 1  # 18 voxels
    labels[5:8, 1:6, 0:4] = 2  # 60 voxels
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([0.8, 1.25, 2.5])  # 2.5 mm³ per voxel
    affine[:3, 3] = [-40, 12, 7]
    (tmp_path / "labels").mkdir()
    nib.save(nib.Nifti1Image(labels, affine), tmp_path / "labels" / "c1.nii.gz")
    volumes = structure_volumes_ml(tmp_path / "labels" / "c1.nii.gz", {1: "anterior", 2: "posterior", 3: "absent"})
    assert volumes == pytest.approx({"anterior": 18 * 2.5 / 1000, "posterior": 60 * 2.5 / 1000, "absent": 0.0})
    manifest = write_manifest([Case("c1", ("images/c1.nii.gz",), "labels/c1.nii.gz", "train"),
                               Case("c2", ("images/c2.nii.gz",), None, "test")], tmp_path / "m.csv")
    out = write_structure_volumes(read_manifest(manifest), tmp_path, {1: "anterior", 2: "posterior"},
                                  tmp_path / "volumes.csv")
    table = read_targets(out, ["anterior_ml", "posterior_ml"])
    assert list(table.values) == ["c1"]  # the unlabelled case has nothing to measure
    np.testing.assert_allclose(table.array(["c1"]), [[0.045, 0.15]])


def test_a_case_id_a_spreadsheet_would_run_is_written_as_text_and_read_back_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "labels").mkdir()
    labels = np.zeros((5, 6, 7), dtype=np.uint8)
    labels[1:3, 1:4, 2:6] = 1  # 24 voxels of 1 mm³
    nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp_path / "labels" / "x.nii.gz")
    manifest = write_manifest([Case("=HYPERLINK(1)", ("images/x.nii.gz",), "labels/x.nii.gz", "train")],
                              tmp_path / "m.csv")

    out = write_structure_volumes(read_manifest(manifest), tmp_path, {1: "anterior"}, tmp_path / "volumes.csv")

    assert out.read_text(encoding="utf-8").splitlines()[1].startswith("'=HYPERLINK(1)")
    np.testing.assert_allclose(read_targets(out, ["anterior_ml"]).array(["=HYPERLINK(1)"]), [[0.024]])
