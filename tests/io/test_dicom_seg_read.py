"""DICOM SEG files read as label maps, on the geometry of the series they segment."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medseg.errors import VolumeReadError
from medseg.io import dicom_seg
from medseg.io.dicom_seg import write_dicom_seg
from medseg.io.dicom_sniff import is_dicom_seg
from medseg.io.formats import FORMATS
from medseg.io.readers import load_volume

pytest.importorskip("highdicom")

SHAPE_XYZ = (11, 9, 6)  # columns, rows, slices: odd and anisotropic on purpose
SPACING = (0.7, 1.1, 2.5)
ORIGIN = (-12.5, 30.0, 7.25)


def _oblique_direction(angle_deg: float = 20.0) -> tuple[float, ...]:
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return tuple(float(v) for v in rot.ravel())


def write_sitk_series(folder: Path, seed: int = 0) -> tuple[Path, str]:
    """A CT series written by SimpleITK in LPS with a rotated direction, an offset origin and
    anisotropic spacing; returns the folder and its SeriesInstanceUID."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    volume = sitk.GetImageFromArray(rng.integers(-100, 400, size=SHAPE_XYZ[::-1]).astype(np.int16))
    volume.SetSpacing(SPACING)
    volume.SetOrigin(ORIGIN)
    volume.SetDirection(_oblique_direction())
    direction = volume.GetDirection()
    stamp = int(time.time())  # a UID component has no leading zero (an %H%M%S stamp had one before 10:00)
    series_uid = f"1.2.826.0.1.3680043.2.1125.{seed}.{stamp}.1"
    common = [
        ("0008|0060", "CT"), ("0008|0016", "1.2.840.10008.5.1.4.1.1.2"), ("0010|0010", "Test^Patient"),
        ("0010|0020", "P001"), ("0020|000d", f"1.2.826.0.1.3680043.2.1125.{seed}.{stamp}.2"),
        ("0020|000e", series_uid), ("0020|0052", f"1.2.826.0.1.3680043.2.1125.{seed}.{stamp}.3"),
        ("0020|0037", "\\".join(f"{v:.10f}" for v in (direction[0], direction[3], direction[6],
                                                       direction[1], direction[4], direction[7]))),
        ("0008|0020", "20240101"), ("0008|0030", "120000"), ("0020|0011", "1"), ("0018|0050", f"{SPACING[2]}"),
    ]
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in range(volume.GetDepth()):
        piece = volume[:, :, k]
        for tag, value in common:
            piece.SetMetaData(tag, value)
        position = volume.TransformIndexToPhysicalPoint((0, 0, k))
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        writer.SetFileName(str(folder / f"IM{5 - k:04d}.dcm"))  # file names against slice order, on purpose
        writer.Execute(piece)
    for path in folder.glob("*.dcm"):  # SimpleITK may write the 2D slice's own z spacing (1) there
        ds = pydicom.dcmread(path)
        if "SpacingBetweenSlices" in ds:
            del ds.SpacingBetweenSlices
            ds.save_as(path)
    return folder, series_uid


def _labels(seed: int = 1) -> np.ndarray:
    """(x, y, z) label map with values 1..3 and something on every slice (so every frame is written)."""
    labels = np.zeros(SHAPE_XYZ, dtype=np.uint8)
    labels[2:6, 1:4, :] = 1
    labels[7:10, 5:8, 1:5] = 2
    labels[0, 8, 0::2] = 3
    labels[7, 5, 0] = 2
    labels[9, 7, 5] = 2
    return labels


def test_a_seg_reads_back_to_its_labels_on_the_series_grid(tmp_path: Path) -> None:
    folder, uid = write_sitk_series(tmp_path / "series")
    series = load_volume(folder)
    labels = _labels()
    seg_path = write_dicom_seg(labels, folder, uid, {0: "bg", 1: "liver", 2: "tumour", 3: "vessel"},
                               tmp_path / "label.dcm")
    assert is_dicom_seg(seg_path) and not is_dicom_seg(next(folder.glob("*.dcm")))
    # its own format, though named .dcm like the series it refines; a series slice stays DICOM
    assert FORMATS.for_path(seg_path).name == "dicom-seg"
    assert FORMATS.for_path(next(folder.glob("*.dcm"))).name == "dicom"
    assert FORMATS.by_suffix(seg_path.name).name == "dicom"  # by name alone (nothing read): DICOM

    seg = load_volume(seg_path)
    assert tuple(seg.shape) == (1, *SHAPE_XYZ) == tuple(series.shape)
    np.testing.assert_array_equal(seg[0].numpy(), labels)
    np.testing.assert_allclose(seg.affine.numpy(), series.affine.numpy(), atol=1e-4)
    assert not np.allclose(series.affine.numpy()[:3, :3], np.diag(np.diag(series.affine.numpy()[:3, :3])))


def test_without_highdicom_the_message_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder, uid = write_sitk_series(tmp_path / "series", seed=2)
    seg_path = write_dicom_seg(_labels(), folder, uid, {1: "a", 2: "b", 3: "c"}, tmp_path / "label.dcm")
    monkeypatch.setattr(dicom_seg, "dicom_seg_available", lambda: False)
    with pytest.raises(VolumeReadError, match=r"label\.dcm: a DICOM SEG.*pip install 'medseg\[dicom-seg\]'"):
        load_volume(seg_path)


def test_a_seg_beside_its_series_is_not_a_scan_to_predict(tmp_path: Path) -> None:
    from medseg.io.discovery import discover

    folder, uid = write_sitk_series(tmp_path / "inputs" / "patient1")
    write_dicom_seg(_labels(), folder, uid, {0: "bg", 1: "liver", 2: "tumour", 3: "vessel"},
                    tmp_path / "inputs" / "patient1_seg.dcm")

    found = discover(tmp_path / "inputs")

    assert [(c.case_id, c.kind) for c in found.cases] == [("patient1", "dicom_series")]
    assert any("patient1_seg.dcm: skipped, a dicom-seg file holds labels" in note for note in found.notes)
