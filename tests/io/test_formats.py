"""The input-format registry: one list of formats that reading, predict's discovery, ``manifest
build`` and ``verify`` share, extended by a package through the ``medseg.readers`` entry points.

The plugin here is installed the way ``pip install`` leaves one (a module beside a ``.dist-info``
with its ``entry_points.txt``) and reads ``.npy`` arrays with MONAI's own ``NumpyReader``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medseg
from medseg.data.folders import discover_cases
from medseg.errors import VolumeReadError
from medseg.io.discovery import discover
from medseg.io.formats import ENTRY_POINT_GROUP, FORMATS, VolumeFormat
from medseg.io.readers import load_volume, make_load_transform

PLUGIN_MODULE = '''
from monai.data import NumpyReader
from medseg.io.formats import VolumeFormat

NPY = VolumeFormat("numpy", (".npy",), NumpyReader)
BROKEN = 42  # not a VolumeFormat: must be skipped with a warning, not break the built-in formats
'''


def _install(site: Path, entries: str, monkeypatch: pytest.MonkeyPatch) -> None:
    site.mkdir()
    (site / "medseg_npy_format.py").write_text(PLUGIN_MODULE)
    dist = site / "medseg_npy_format-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: medseg-npy-format\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{entries}\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(FORMATS, "_plugins_loaded", False)


@pytest.fixture
def npy_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _install(tmp_path / "site", "numpy = medseg_npy_format:NPY\nbroken = medseg_npy_format:BROKEN", monkeypatch)
    yield
    FORMATS.unregister("numpy")


def _nifti(path: Path, shape: tuple[int, ...], seed: int) -> Path:
    data = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([0.7, 1.3, 2.5, 1.0])), path)
    return path


def test_builtin_formats_are_listed_with_their_suffixes() -> None:
    names = {f.name: f for f in FORMATS.formats()}
    assert {"nifti", "dicom", "metaimage", "nrrd"} <= set(names)
    assert FORMATS.by_suffix("CASE.NII.GZ") is names["nifti"]
    assert FORMATS.by_suffix("scan.mhd") is names["metaimage"]
    assert FORMATS.by_suffix("notes.txt") is None
    assert FORMATS.strip_suffix("hippocampus_001.nii.gz") == "hippocampus_001"
    assert FORMATS.strip_suffix("a.b.nrrd") == "a.b"


def test_a_plugin_format_is_read_found_by_predict_discovery_listed_by_manifest_build_and_verified(
        npy_plugin: None, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="medseg.io.formats"):
        assert FORMATS.by_suffix("x.npy") is not None
    assert any("broken" in r.getMessage() and "VolumeFormat" in r.getMessage() for r in caplog.records)

    root = tmp_path / "data"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    rng = np.random.default_rng(3)
    for i in range(5):
        np.save(root / "images" / f"case{i}.npy", rng.normal(size=(9, 7, 5)).astype(np.float32))
        np.save(root / "labels" / f"case{i}.npy", (rng.random((9, 7, 5)) > 0.7).astype(np.uint8))
    _nifti(root / "images" / "case5.nii.gz", (9, 7, 5), 5)
    _nifti(root / "labels" / "case5.nii.gz", (9, 7, 5), 6)
    (root / "images" / "readme.txt").write_text("not an image")

    volume = load_volume(root / "images" / "case0.npy")
    assert tuple(volume.shape) == (1, 9, 7, 5)
    loaded = make_load_transform(["image"])({"image": str(root / "images" / "case1.npy")})
    assert tuple(loaded["image"].shape) == (1, 9, 7, 5)

    found = discover(root / "images")
    assert [c.case_id for c in found.cases] == [f"case{i}" for i in range(6)]
    assert {c.kind for c in found.cases} == {"file"}

    assert [c.case_id for c in discover_cases(root)] == [f"case{i}" for i in range(6)]
    manifest = medseg.build_manifest(root, tmp_path / "manifest.csv", val_fraction=0.4)
    assert len(manifest.cases) == 6
    assert all(c.label is not None for c in manifest.cases)

    report = medseg.verify(tmp_path / "manifest.csv", root=root, labels=[0, 1], progress=False)
    assert report.n_cases == 6
    assert [f for f in report.findings if f.check == "unreadable"] == []
    (root / "labels" / "case4.npy").write_bytes(b"\x93NUMPY truncated")  # now the plugin's reader fails on it
    report = medseg.verify(tmp_path / "manifest.csv", root=root, progress=False)
    assert [(f.check, f.case_id) for f in report.findings if f.check == "unreadable"] == [("unreadable", "case4")]


def test_a_file_of_no_registered_format_is_refused_with_the_list_of_formats(tmp_path: Path) -> None:
    path = tmp_path / "scan.xyz"
    path.write_bytes(b"\x00" * 64)
    with pytest.raises(VolumeReadError) as err:
        load_volume(path)
    message = str(err.value)
    assert str(path) in message and "not a format medseg reads" in message
    assert "nifti (.nii .nii.gz)" in message and ENTRY_POINT_GROUP in message


def test_channel_files_of_two_formats_are_refused(tmp_path: Path) -> None:
    first = _nifti(tmp_path / "t1.nii.gz", (6, 5, 4), 0)
    second = tmp_path / "t2.mha"
    second.write_bytes(b"")
    with pytest.raises(VolumeReadError, match="different formats.*nifti.*metaimage"):
        load_volume([first, second])


def test_a_suffix_or_name_already_taken_is_refused() -> None:
    from monai.data import NumpyReader

    with pytest.raises(ValueError, match=r"\['.nii'\] already belong to format 'nifti'"):
        FORMATS.register(VolumeFormat("other_nifti", (".nii",), NumpyReader))
    with pytest.raises(ValueError, match="already registered"):
        FORMATS.register(VolumeFormat("nrrd", (".nrrd2",), NumpyReader))
    with pytest.raises(ValueError, match="lower case and start with a dot"):
        FORMATS.register(VolumeFormat("upper", (".NPZ",), NumpyReader))
    with FORMATS.registered(VolumeFormat("npz_test", (".npz",), NumpyReader)):
        assert FORMATS.by_suffix("a.npz") is not None
    assert FORMATS.by_suffix("a.npz") is None
