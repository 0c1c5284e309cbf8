"""Hostile DICOM series folders: each one reads with the right geometry or fails with a message
that names the folder or files, the problem (what was expected, what was found) and the fix.

Every series is written here with pydicom: tiny int16 CT slices (9 rows x 7 columns), seeded pixels,
one SeriesInstanceUID, positions along z unless a test says otherwise. Expected geometry comes from
the values written, never from the reader under test.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from medseg.io.discovery import discover
from medseg.io.geometry import geometry_of
from medseg.io.readers import VolumeReadError, load_volume, read_dicom_series

ROWS, COLUMNS = 9, 7
PIXEL_SPACING = (0.8, 0.7)  # DICOM order: between rows (y), between columns (x)
STEP = 2.5
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
ORIGIN = (-10.0, 5.0, 0.0)
ZS = (0.0, 2.5, 5.0, 7.5, 10.0)


def write_slice(path: Path, z: float, *, series_uid: str, seed: int, rows: int = ROWS, columns: int = COLUMNS,
                spacing: tuple[float, float] = PIXEL_SPACING, orientation: tuple[float, ...] = AXIAL,
                position: tuple[float, float, float] | None = None, pixels: np.ndarray | None = None,
                instance: int = 1, sop_uid: str | None = None, **extra: Any) -> np.ndarray:
    """One CT slice file; returns its (rows, columns) int16 pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CT"
    ds.PatientName = "Hostile^Test"
    ds.PatientID = "P1"
    ds.SeriesDescription = "CT"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = series_uid
    ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = list(position if position is not None else (ORIGIN[0], ORIGIN[1], z))
    ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = list(spacing)
    ds.SliceThickness = STEP
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope = 0, 1
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    if pixels is None:
        pixels = np.random.default_rng(seed).integers(-1000, 1000, size=(rows, columns)).astype(np.int16)
    ds.PixelData = pixels.astype(np.int16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return pixels


def write_series(folder: Path, zs: tuple[float, ...] = ZS, overrides: dict[int, dict[str, Any]] | None = None,
                 names: str = "s{i:02d}.dcm", series_uid: str | None = None, seed: int = 0,
                 **common: Any) -> list[np.ndarray]:
    """Slice i at z = zs[i] in file ``names.format(i=i)``; ``overrides[i]`` changes slice i only."""
    series_uid = series_uid or generate_uid()
    overrides = overrides or {}
    return [
        write_slice(folder / names.format(i=i), z, series_uid=series_uid, seed=seed * 1000 + i, instance=i + 1,
                    **{**common, **overrides.get(i, {})})
        for i, z in enumerate(zs)
    ]


def refused(folder: Path, *needles: str) -> str:
    """The VolumeReadError message for ``folder``, checked to name the folder and each needle."""
    with pytest.raises(VolumeReadError) as info:
        load_volume(folder)
    message = str(info.value)
    assert str(folder) in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in: {message}"
    assert "could not be read" not in message, message
    return message


def assert_axial_volume(folder: Path, pixels: list[np.ndarray], spacing_z: float = STEP) -> None:
    """``folder`` reads as the written slices, stacked along z, with the written spacing and origin."""
    volume = load_volume(folder)
    geometry = geometry_of(volume)
    assert tuple(volume.shape) == (1, COLUMNS, ROWS, len(pixels))
    np.testing.assert_allclose(geometry.spacing, (PIXEL_SPACING[1], PIXEL_SPACING[0], spacing_z), atol=1e-6)
    np.testing.assert_allclose(geometry.origin, (-ORIGIN[0], -ORIGIN[1], ORIGIN[2]), atol=1e-6)  # LPS -> RAS
    for k, expected in enumerate(pixels):
        np.testing.assert_array_equal(volume[0, :, :, k].numpy(), expected.T, err_msg=f"slice {k}")


# --- good series -------------------------------------------------------------------------------


def test_good_series_reads_with_geometry(tmp_path: Path) -> None:
    folder = tmp_path / "ct"
    pixels = write_series(folder)
    assert_axial_volume(folder, pixels)
    assert load_volume(folder).meta["dicom_num_files"] == "5"


def test_oblique_series_in_shuffled_file_order_matches_simplitk(tmp_path: Path) -> None:
    """Slice order comes from positions along the (oblique, flipped) normal, as GDCM sorts them."""
    a = np.deg2rad(20.0)
    row = np.array([np.cos(a), np.sin(a), 0.0])
    column = np.array([0.0, 0.0, -1.0])  # coronal-ish: the normal points along -y
    normal = np.cross(row, column)
    origin = np.array([3.0, -4.0, 12.0])
    folder = tmp_path / "oblique"
    order = [3, 0, 4, 1, 2]  # file k holds slice order[k]
    uid = generate_uid()
    for k, i in enumerate(order):
        write_slice(folder / f"f{k}.dcm", 0.0, series_uid=uid, seed=i, orientation=(*row, *column),
                    position=tuple(origin + i * 1.7 * normal))

    reference = sitk.ImageSeriesReader()
    reference.SetFileNames(reference.GetGDCMSeriesFileNames(str(folder)))
    expected = reference.Execute()
    volume = load_volume(folder)

    assert tuple(volume.shape) == (1, COLUMNS, ROWS, 5)
    np.testing.assert_allclose(geometry_of(volume).spacing, (PIXEL_SPACING[1], PIXEL_SPACING[0], 1.7), atol=1e-5)
    np.testing.assert_array_equal(volume[0].numpy(), sitk.GetArrayFromImage(expected).transpose(2, 1, 0))
    flip = np.diag([-1.0, -1.0, 1.0])
    np.testing.assert_allclose(flip @ volume.affine.numpy()[:3, 3], origin, atol=1e-4)
    np.testing.assert_allclose(flip @ volume.affine.numpy()[:3, 2], 1.7 * normal, atol=1e-4)


# --- missing slices, uneven steps ---------------------------------------------------------------


def test_missing_middle_slice_is_refused(tmp_path: Path) -> None:
    """Before: read silently with a stretched z spacing of 3.33 mm (SimpleITK only warned on stderr)."""
    folder = tmp_path / "missing"
    write_series(folder, zs=(0.0, 2.5, 7.5, 10.0))
    message = refused(folder, "slices missing", "s01.dcm", "s02.dcm", "expected step between slices is 2.5 mm",
                      "are 5 mm apart", "about 1 slice(s) missing", "Re-export")
    assert "(-10, 5, 2.5)" in message and "(-10, 5, 7.5)" in message, message


def test_several_missing_slices_are_counted(tmp_path: Path) -> None:
    folder = tmp_path / "missing3"
    write_series(folder, zs=(0.0, 2.5, 5.0, 15.0, 17.5, 20.0))
    refused(folder, "slices missing", "s02.dcm", "s03.dcm", "are 10 mm apart", "about 3 slice(s) missing")


def test_uneven_slice_steps_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "uneven"
    write_series(folder, zs=(0.0, 2.5, 5.0, 6.5, 9.0, 11.5))
    refused(folder, "uneven slice spacing", "s02.dcm", "s03.dcm", "are 1.5 mm apart", "median 2.5 mm")


# --- duplicate positions ------------------------------------------------------------------------


@pytest.mark.parametrize("same_instance", [True, False], ids=["file-copy", "re-sent-new-uid"])
def test_identical_duplicate_slice_is_read_once(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                same_instance: bool) -> None:
    """Before: read as 6 slices with a 2 mm z spacing. Now: one copy is skipped, with a warning."""
    folder = tmp_path / "dup"
    pixels = write_series(folder)
    if same_instance:
        shutil.copy(folder / "s02.dcm", folder / "s02 copy.dcm")
    else:
        write_slice(folder / "s02 copy.dcm", ZS[2], series_uid=str(pydicom.dcmread(folder / "s02.dcm").SeriesInstanceUID),
                    seed=99, pixels=pixels[2], instance=9)

    with caplog.at_level(logging.WARNING, logger="medseg.io.sitk_reader"):
        assert_axial_volume(folder, pixels)
    assert "s02 copy.dcm, s02.dcm hold identical slices" in caplog.text
    assert load_volume(folder).meta["dicom_num_files"] == "5"


def test_conflicting_duplicate_slices_are_refused(tmp_path: Path) -> None:
    """Before: read as 6 slices with a 2 mm z spacing, two different images at one position."""
    folder = tmp_path / "dupconflict"
    write_series(folder, zs=(0.0, 2.5, 5.0, 5.0, 7.5, 10.0))
    refused(folder, "duplicate slice position", "s02.dcm, s03.dcm", "ImagePositionPatient (-10, 5, 5)",
            "different pixel data", "63 of 63 pixels differ", "Keep one of them")


def test_duplicate_position_shifted_in_plane_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "dupshift"
    write_series(folder, overrides={3: {"position": (-4.0, 5.0, 5.0)}})
    refused(folder, "s02.dcm, s03.dcm", "shifted in-plane", "(-10, 5, 5) vs (-4, 5, 5)")


# --- slices that differ -------------------------------------------------------------------------


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    """Before: read silently with the first slice's orientation for all."""
    folder = tmp_path / "orient"
    a = np.deg2rad(10.0)
    write_series(folder, overrides={2: {"orientation": (np.cos(a), np.sin(a), 0.0, -np.sin(a), np.cos(a), 0.0)}})
    refused(folder, "differ in ImageOrientationPatient", "(1, 0, 0, 0, 1, 0) in 4 file(s)",
            "(0.9848, 0.1736, 0, -0.1736, 0.9848, 0) in 1 file(s) (s02.dcm)", "Move the slices that differ")


def test_mixed_pixel_spacing_is_refused(tmp_path: Path) -> None:
    """Before: read silently with the first slice's pixel spacing for all."""
    folder = tmp_path / "spacing"
    write_series(folder, overrides={4: {"spacing": (0.5, 0.5)}})
    refused(folder, "differ in PixelSpacing", "(0.8, 0.7) in 4 file(s)", "(0.5, 0.5) in 1 file(s) (s04.dcm)")


def test_mixed_rows_columns_is_refused(tmp_path: Path) -> None:
    """Before: 'could not be read as an image (RuntimeError:   Size: [7, 8, 1])'."""
    folder = tmp_path / "size"
    write_series(folder, overrides={1: {"rows": 8}, 3: {"rows": 11, "columns": 5}})
    refused(folder, "differ in image size (Rows x Columns)", "9 x 7 in 3 file(s)", "8 x 7 in 1 file(s) (s01.dcm)",
            "11 x 5 in 1 file(s) (s03.dcm)")


def test_slice_without_position_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "noposition"
    write_series(folder)
    ds = pydicom.dcmread(folder / "s03.dcm")
    del ds.ImagePositionPatient
    ds.save_as(folder / "s03.dcm")
    refused(folder, "1 of the 5 slices have no ImagePositionPatient", "s03.dcm")


def test_malformed_orientation_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "badiop"
    write_series(folder, orientation=(1.0, 0.0, 0.0, 1.0, 0.0, 0.0))
    with pytest.raises(VolumeReadError, match="not two perpendicular unit vectors") as info:
        load_volume(folder)
    assert str(folder) in str(info.value)


def test_multi_frame_file_inside_a_series_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "multiframe"
    write_series(folder, zs=(0.0, 2.5, 5.0))
    uid = str(pydicom.dcmread(folder / "s00.dcm").SeriesInstanceUID)
    frames = np.random.default_rng(7).integers(-1000, 1000, size=(2, ROWS, COLUMNS)).astype(np.int16)
    write_slice(folder / "s03.dcm", 7.5, series_uid=uid, seed=3, pixels=frames, NumberOfFrames=2)
    refused(folder, "multi-frame", "s03.dcm", "NumberOfFrames 2", "Load each multi-frame file on its own")


def test_two_series_in_one_folder_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "two"
    first, second = generate_uid(), generate_uid()
    write_series(folder, series_uid=first, names="a{i}.dcm")
    write_series(folder, zs=(0.0, 2.5, 5.0), series_uid=second, names="b{i}.dcm", SeriesDescription="other/../x")
    message = refused(folder, "holds 2 DICOM series", first, second, "one folder per SeriesInstanceUID")
    assert "(5 files, 'CT')" in message and "(3 files, 'other/../x')" in message, message


@pytest.mark.parametrize("damaged", ["s02.dcm", "s04.dcm"], ids=["middle", "last"])
def test_truncated_slice_is_named(tmp_path: Path, damaged: str) -> None:
    """Before: GDCM silently left the truncated file out; the last slice went missing unnoticed."""
    folder = tmp_path / "truncated"
    write_series(folder)
    payload = (folder / damaged).read_bytes()
    (folder / damaged).write_bytes(payload[:-30])
    message = refused(folder, f"cannot be parsed by the DICOM reader and would be left out ({damaged})",
                      "truncated or damaged", "Copy them again")
    assert "slices missing" not in message


def test_only_truncated_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "alltruncated"
    write_series(folder, zs=ZS[:2])
    for path in folder.iterdir():
        path.write_bytes(path.read_bytes()[:200])
    refused(folder, "no DICOM image series found", "2 file(s) start like DICOM", "s00.dcm, s01.dcm",
            "truncated or damaged")


# --- small volumes ------------------------------------------------------------------------------


def test_one_slice_series_reads_as_one_slice_volume(tmp_path: Path) -> None:
    folder = tmp_path / "one"
    pixels = write_series(folder, zs=(0.0,))
    volume = load_volume(folder)
    assert tuple(volume.shape) == (1, COLUMNS, ROWS, 1)
    np.testing.assert_allclose(geometry_of(volume).spacing[:2], (PIXEL_SPACING[1], PIXEL_SPACING[0]))
    np.testing.assert_array_equal(volume[0, :, :, 0].numpy(), pixels[0].T)


@pytest.mark.parametrize("n_slices", [1, 3])
def test_one_by_one_pixel_slices(tmp_path: Path, n_slices: int) -> None:
    """Before, for 3 slices: shape (3, 1, 1), slices stacked along x with the step as x spacing."""
    folder = tmp_path / "tiny"
    pixels = write_series(folder, zs=ZS[:n_slices], rows=1, columns=1)
    volume = load_volume(folder)
    assert tuple(volume.shape) == (1, 1, 1, n_slices)
    np.testing.assert_array_equal(volume[0, 0, 0].numpy(), [p[0, 0] for p in pixels])
    if n_slices > 1:
        np.testing.assert_allclose(geometry_of(volume).spacing, (PIXEL_SPACING[1], PIXEL_SPACING[0], STEP))


def test_one_row_slices_keep_the_oblique_grid(tmp_path: Path) -> None:
    """Before: shape (5, 4, 1), slices stacked along y (SimpleITK reads a one-row slice as 1D).

    Slices one row high land on the same grid as two-row slices with the same headers."""
    a = np.deg2rad(25.0)
    orientation = (np.cos(a), np.sin(a), 0.0, 0.0, 0.0, -1.0)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = {i: {"position": tuple(np.array([1.0, 2.0, 3.0]) + 1.25 * i * normal)} for i in range(4)}
    one_row, two_rows = tmp_path / "one_row", tmp_path / "two_rows"
    pixels = write_series(one_row, zs=ZS[:4], overrides=positions, rows=1, columns=5, orientation=orientation)
    write_series(two_rows, zs=ZS[:4], overrides=positions, rows=2, columns=5, orientation=orientation)

    volume, reference = load_volume(one_row), load_volume(two_rows)

    assert tuple(volume.shape) == (1, 5, 1, 4)
    np.testing.assert_allclose(volume.affine.numpy(), reference.affine.numpy(), atol=1e-5)
    for k, expected in enumerate(pixels):
        np.testing.assert_array_equal(volume[0, :, :, k].numpy(), expected.T)


def test_two_slice_series(tmp_path: Path) -> None:
    folder = tmp_path / "two_slices"
    pixels = write_series(folder, zs=(0.0, 2.5))
    assert_axial_volume(folder, pixels)


# --- awkward names and header strings -----------------------------------------------------------


def test_folder_and_file_names_with_spaces_non_ascii_and_dot_folders(tmp_path: Path) -> None:
    folder = tmp_path / "My Séries ü 雪" / ".hidden dir" / "..x y"
    pixels = write_series(folder, names="slice {i} é 雪.dcm")
    assert_axial_volume(folder, pixels)
    assert read_dicom_series(folder).GetSize() == (COLUMNS, ROWS, 5)


def test_hidden_slice_file_is_refused(tmp_path: Path) -> None:
    """Before: GDCM skipped the hidden slice silently; as the last slice it left no gap to notice."""
    folder = tmp_path / "hidden"
    write_series(folder, zs=(0.0, 2.5, 5.0, 7.5))
    (folder / "s03.dcm").rename(folder / ".s03.dcm")  # the last slice: no gap shows
    refused(folder, "1 hidden file(s) hold DICOM data of this series (.s03.dcm)", "without the leading dot")


def test_only_hidden_slice_files_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "allhidden"
    write_series(folder, names=".slice {i} é.dcm")
    refused(folder, "no DICOM image series found", "5 hidden file(s) hold DICOM data", ".slice 0 é.dcm",
            "and 2 more", "without the leading dot")


def test_hidden_non_dicom_and_other_series_files_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "junk"
    pixels = write_series(folder)
    (folder / "._s00.dcm").write_bytes(b"\x00\x05\x16\x07" + bytes(200))  # macOS AppleDouble
    (folder / ".DS_Store").write_bytes(bytes(300))
    write_slice(folder / ".other.dcm", 0.0, series_uid=generate_uid(), seed=5)
    assert_axial_volume(folder, pixels)


def test_path_separators_in_header_strings_are_only_metadata(tmp_path: Path) -> None:
    """Header strings with '/', '\\' and '..' come through verbatim and never become paths."""
    folder = tmp_path / "headers"
    description, patient = "../../etc/passwd", "a/b\\c/../d"
    pixels = write_series(folder, SeriesDescription=description, PatientID=patient, PatientName="..^/")
    before = sorted(tmp_path.rglob("*"))

    assert_axial_volume(folder, pixels)
    volume = load_volume(folder)
    assert volume.meta["series_description"] == description
    cases = discover(tmp_path).cases

    assert sorted(tmp_path.rglob("*")) == before  # nothing written anywhere
    assert [c.case_id for c in cases] == ["headers"]  # named after the folder, not the header
    assert [c.path for c in cases] == [folder]
