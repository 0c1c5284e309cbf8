"""nnU-Net channel files (X_0000, X_0001, ...) discovered as one case with several channels when
the model takes that many (the whole rule: tests/io/test_channel_grouping.py)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.io.discovery import discover


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((3, 4, 5), np.float32), np.eye(4)), path)
    return path


def test_channel_files_make_one_case_in_channel_order(tmp_path: Path) -> None:
    for name in ("a_0001.nii.gz", "a_0000.nii.gz", "b_0000.nii.gz", "sub/c_0000.nii.gz", "sub/c_0001.nii.gz",
                 "plain.nii.gz", "scan_2019.nii.gz"):
        _touch(tmp_path / name)
    cases = {c.case_id: c for c in discover(tmp_path, channels=2).cases}
    assert set(cases) == {"a", "b", "sub__c", "plain", "scan_2019"}
    assert [p.name for p in cases["a"].paths] == ["a_0000.nii.gz", "a_0001.nii.gz"]
    assert cases["a"].source == [str(tmp_path / "a_0000.nii.gz"), str(tmp_path / "a_0001.nii.gz")]
    assert "channel(s) 0001 missing" in (cases["b"].problem or "")  # a lone _0000 is not a 2-channel case
    one_channel = {c.case_id for c in discover(tmp_path, channels=1).cases}
    assert {"b", "a_0000", "a_0001", "sub__c_0000"} <= one_channel  # a lone _0000 names case b; the rest are files
    assert [p.name for p in cases["sub__c"].paths] == ["c_0000.nii.gz", "c_0001.nii.gz"]
    assert cases["scan_2019"].channels == () and cases["plain"].problem is None  # no _0000: an ordinary file


def test_a_gap_in_the_channels_is_a_failed_case(tmp_path: Path) -> None:
    _touch(tmp_path / "x_0000.nii.gz")
    _touch(tmp_path / "x_0002.nii.gz")
    (case,) = discover(tmp_path, channels=2).cases
    assert case.case_id == "x" and case.problem is not None
    assert "Expected 2 channel files x_0000 to x_0001" in case.problem and "channel(s) 0001 missing" in case.problem


def test_a_file_and_channel_files_with_one_case_id_both_fail(tmp_path: Path) -> None:
    _touch(tmp_path / "x.nii.gz")
    _touch(tmp_path / "x_0000.nii.gz")
    cases = discover(tmp_path).cases
    assert [c.case_id for c in cases] == ["x", "x"] and all("is shared by" in (c.problem or "") for c in cases)
