"""``load_volume`` on real DICOM/NIfTI files and on awkward synthetic MHA/NRRD/multi-frame files.

Geometry is checked against an independent reference (SimpleITK, pydicom or nibabel read directly),
never against ``load_volume`` itself, so a sign slip in the LPS->RAS flip or a file-name slice order
cannot pass unnoticed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from monai.data import MetaTensor

from medseg.io.geometry import geometry_of
from medseg.io.readers import VolumeReadError, load_volume
from tests.conftest import HIPPO, TCIA, oblique_affine, require

Spacing = tuple[float, float, float]
Point = tuple[float, float, float]

#: LPS -> RAS flip of world coordinates (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0])

# TCIA PGBM-001 facts from shared/data/README.md section 3.
TCIA_SHAPE = (260, 320, 24)
TCIA_SPACING = (0.6875, 0.6875, 6.5)
TCIA_ORIGIN_LPS = np.array([-83.300, -115.806, -61.453])
# Listed row by row, like SimpleITK's row-major GetDirection(): its *columns* are the voxel axes
# (first column = ImageOrientationPatient row cosines), checked against SimpleITK below.
TCIA_DIRECTION_LPS = np.array([[0.9981, 0.0, -0.0619], [0.0102, 0.9862, 0.1650], [0.0611, -0.1654, 0.9843]])
TUMOUR_VOXELS = 6809
TUMOUR_ML = 20.9


def _series(name: str) -> Path:
    return require(TCIA / name)


def _sitk_series(folder: Path) -> sitk.Image:
    """The reference reading: SimpleITK/GDCM directly, without medseg in between."""
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    return reader.Execute()


def _sitk_direction(image: sitk.Image) -> np.ndarray:
    dim = image.GetDimension()
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)


def _expected_ras_affine(direction_lps: np.ndarray, spacing: Spacing, origin_lps: Point) -> np.ndarray:
    """Built with FLIP, not ``readers.lps_to_ras``, so the reference shares no code with the reader."""
    affine = np.eye(4)
    affine[:3, :3] = FLIP @ direction_lps @ np.diag(spacing)
    affine[:3, 3] = FLIP @ np.asarray(origin_lps)
    return affine


def _oblique_rotation() -> np.ndarray:
    """A rotation about two axes, so every voxel axis is oblique and x/y/z mix-ups show."""
    a, b = np.deg2rad(23.0), np.deg2rad(-11.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    rx = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(b), -np.sin(b)], [0.0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture(scope="module")
def t1post() -> MetaTensor:
    """Loaded once: several tests look at the same real series."""
    return load_volume(_series("T1post"))


# --- real DICOM series -------------------------------------------------------------------------


def test_t1post_series_geometry_and_meta(t1post: MetaTensor) -> None:
    """Shape, spacing, origin and oblique direction of a real series all survive the LPS->RAS flip."""
    reference = _sitk_series(_series("T1post"))
    geometry = geometry_of(t1post)

    assert tuple(t1post.shape) == (1, *TCIA_SHAPE)
    np.testing.assert_allclose(geometry.spacing, TCIA_SPACING, atol=1e-3)
    np.testing.assert_allclose(geometry.origin, FLIP @ TCIA_ORIGIN_LPS, atol=1e-2)

    direction_lps = _sitk_direction(reference)
    np.testing.assert_allclose(geometry.direction, FLIP @ direction_lps, atol=1e-6)
    # The README matrix is SimpleITK's, not its transpose (they differ by 0.0102 at [0, 1]).
    np.testing.assert_allclose(direction_lps, TCIA_DIRECTION_LPS, atol=1e-3)
    assert not np.allclose(direction_lps, TCIA_DIRECTION_LPS.T, atol=1e-3)
    # Its first column is the in-plane row direction of ImageOrientationPatient.
    header = pydicom.dcmread(_series("T1post") / "000000.dcm", stop_before_pixels=True)
    row_cosines = [float(v) for v in header.ImageOrientationPatient[:3]]
    np.testing.assert_allclose(TCIA_DIRECTION_LPS[:, 0], row_cosines, atol=1e-3)

    assert t1post.meta["modality"] == "MR"
    assert t1post.meta["series_description"] == "T1post"


def test_series_slices_sorted_by_position_not_file_name(t1post: MetaTensor) -> None:
    """Slice k sits at the k-th ImagePositionPatient along the normal, whatever the file names say."""
    files = sorted(_series("T1post").glob("*.dcm"))
    headers = {f.name: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    orientation = np.array([float(v) for v in headers[files[0].name].ImageOrientationPatient])
    normal = np.cross(orientation[:3], orientation[3:])

    def position(name: str) -> np.ndarray:
        return np.array([float(v) for v in headers[name].ImagePositionPatient])

    by_position = sorted(headers, key=lambda name: float(position(name) @ normal))
    assert by_position != [f.name for f in files], "file names already in slice order: test proves nothing"

    affine = t1post.affine.numpy()
    for k, name in enumerate(by_position):
        world_lps = FLIP @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        np.testing.assert_allclose(world_lps, position(name), atol=1e-2, err_msg=f"slice {k} ({name})")


def test_tumour_mask_volume_and_grid(t1post: MetaTensor) -> None:
    """The Secondary Capture mask lands on the MR grid with the published voxel count and volume."""
    mask = load_volume(_series("MaskTumor"))
    voxels = int((mask != 0).sum())
    voxel_ml = abs(np.linalg.det(mask.affine.numpy()[:3, :3])) / 1000.0

    assert voxels == TUMOUR_VOXELS
    assert voxels * voxel_ml == pytest.approx(TUMOUR_ML, abs=0.2)
    assert mask.shape == t1post.shape
    np.testing.assert_allclose(mask.affine.numpy(), t1post.affine.numpy(), atol=1e-4)


def test_two_series_folders_stack_as_channels() -> None:
    """A list of series folders on one grid becomes one multi-channel volume."""
    volume = load_volume([_series("T1post"), _series("T2reg")])
    assert tuple(volume.shape) == (2, *TCIA_SHAPE)


def test_folder_with_two_series_is_refused(tmp_path: Path) -> None:
    """Mixing series in a folder must fail loudly, naming both UIDs and the fix, not silently pick one."""
    uids = []
    for name in ("T1post", "T2reg"):
        files = sorted(_series(name).glob("*.dcm"))
        uids.append(str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID))
        for f in files:
            shutil.copy(f, tmp_path / f"{name}_{f.name}")

    with pytest.raises(VolumeReadError, match="holds 2 DICOM series") as info:
        load_volume(tmp_path)
    message = str(info.value)
    assert all(uid in message for uid in uids), message
    assert "one folder per SeriesInstanceUID" in message
    assert str(tmp_path) in message


def test_empty_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(VolumeReadError, match=f"{re.escape(str(tmp_path))}: no DICOM image series"):
        load_volume(tmp_path)


def test_single_dicom_file_is_a_one_slice_volume(t1post: MetaTensor) -> None:
    """One slice file reads as 3D (last dim 1) at that slice's own position."""
    path = _series("T1post") / "000000.dcm"
    volume = load_volume(path)
    header = pydicom.dcmread(path, stop_before_pixels=True)

    assert tuple(volume.shape) == (1, *TCIA_SHAPE[:2], 1)
    geometry = geometry_of(volume)
    np.testing.assert_allclose(geometry.spacing[:2], TCIA_SPACING[:2], atol=1e-4)
    position_lps = [float(v) for v in header.ImagePositionPatient]
    np.testing.assert_allclose(FLIP @ geometry.origin, position_lps, atol=1e-3)
    np.testing.assert_allclose(geometry.direction, geometry_of(t1post).direction, atol=1e-4)


# --- synthetic files in other formats ----------------------------------------------------------


def test_multi_frame_dicom(tmp_path: Path) -> None:
    """A multi-frame DICOM file keeps its frames as z, its oblique direction and its origin."""
    # This SimpleITK/GDCM build refuses int16 for DICOM ("DICOM does not support this component
    # type"), so uint16 is used; GDCM still writes one multi-frame Secondary Capture file.
    array_zyx = (np.arange(5 * 9 * 7).reshape(5, 9, 7) * 7 % 4001).astype(np.uint16)
    direction = _oblique_rotation()
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.5, -20.25, 30.0))
    image.SetDirection(direction.ravel().tolist())
    path = tmp_path / "multiframe.dcm"
    sitk.WriteImage(image, str(path))
    # Really one multi-frame file, not a 2D slice.
    assert int(pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames) == 5

    volume = load_volume(path)

    assert tuple(volume.shape) == (1, 7, 9, 5)
    np.testing.assert_array_equal(volume[0].numpy(), array_zyx.transpose(2, 1, 0))
    expected = _expected_ras_affine(direction, (0.7, 0.8, 2.5), (10.5, -20.25, 30.0))
    np.testing.assert_allclose(volume.affine.numpy(), expected, atol=1e-4)


def test_hippocampus_nifti_matches_nibabel() -> None:
    path = require(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    reference = nib.load(path)
    volume = load_volume(path)

    assert tuple(volume.shape) == (1, *reference.shape)
    np.testing.assert_allclose(geometry_of(volume).spacing, (1.0, 1.0, 1.0))
    np.testing.assert_allclose(volume.affine.numpy(), reference.affine, atol=1e-6)
    np.testing.assert_array_equal(volume[0].numpy(), np.asarray(reference.dataobj, dtype=np.float32))


def test_nifti_round_trip_oblique_anisotropic(tmp_path: Path) -> None:
    """An odd shape with an oblique, anisotropic affine comes back voxel for voxel, not reoriented."""
    affine = oblique_affine((0.9, 1.3, 2.7), (12.5, -7.0, 3.25))
    data = np.random.default_rng(0).normal(size=(13, 17, 11)).astype(np.float32)
    path = tmp_path / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), path)

    volume = load_volume(path)

    assert tuple(volume.shape) == (1, 13, 17, 11)
    np.testing.assert_array_equal(volume[0].numpy(), data)
    np.testing.assert_allclose(volume.affine.numpy(), affine, atol=1e-5)


def test_dicom_to_nifti_round_trip(t1post: MetaTensor, tmp_path: Path) -> None:
    """DICOM -> NIfTI conversion with the MetaTensor's affine loses neither voxels nor geometry."""
    path = tmp_path / "t1post.nii.gz"
    nib.save(nib.Nifti1Image(t1post[0].numpy(), t1post.affine.numpy()), path)

    reloaded = load_volume(path)

    np.testing.assert_array_equal(reloaded.numpy(), t1post.numpy())
    np.testing.assert_allclose(reloaded.affine.numpy(), t1post.affine.numpy(), atol=1e-4)
    before, after = geometry_of(t1post), geometry_of(reloaded)
    assert after.shape == before.shape
    np.testing.assert_allclose(after.spacing, before.spacing, atol=1e-4)
    np.testing.assert_allclose(after.origin, before.origin, atol=1e-4)
    np.testing.assert_allclose(after.direction, before.direction, atol=1e-4)


@pytest.mark.parametrize("suffix", [".mha", ".nrrd"])
def test_sitk_formats_keep_oblique_geometry(tmp_path: Path, suffix: str) -> None:
    """ITK formats store LPS; the loaded affine must be the same grid expressed in RAS."""
    array_zyx = np.random.default_rng(1).normal(size=(5, 9, 7)).astype(np.float32)
    direction = _oblique_rotation()
    spacing, origin = (0.7, 0.8, 2.5), (10.5, -20.25, 30.0)
    image = sitk.GetImageFromArray(array_zyx)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction.ravel().tolist())
    path = tmp_path / f"oblique{suffix}"
    sitk.WriteImage(image, str(path))

    volume = load_volume(path)

    assert tuple(volume.shape) == (1, 7, 9, 5)
    np.testing.assert_array_equal(volume[0].numpy(), array_zyx.transpose(2, 1, 0))
    expected = _expected_ras_affine(direction, spacing, origin)
    np.testing.assert_allclose(volume.affine.numpy(), expected, atol=1e-6)
    geometry = geometry_of(volume)
    np.testing.assert_allclose(geometry.spacing, spacing, atol=1e-6)
    np.testing.assert_allclose(geometry.origin, FLIP @ np.array(origin), atol=1e-6)
    np.testing.assert_allclose(geometry.direction, FLIP @ direction, atol=1e-6)


# --- bad input ---------------------------------------------------------------------------------


def test_truncated_nifti_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "truncated.nii.gz"
    data = np.random.default_rng(2).normal(size=(20, 21, 22)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])

    with pytest.raises(VolumeReadError, match=f"{re.escape(str(path))}: (truncated or corrupt|could not be read)") as err:
        load_volume(path)
    assert "cut short" in str(err.value) or "truncated" in str(err.value)


def test_text_file_with_nifti_name_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.nii.gz"
    path.write_text("not an image\n")

    with pytest.raises(VolumeReadError, match=f"{re.escape(str(path))}: not a NIfTI image.*not gzip-compressed"):
        load_volume(path)


def test_missing_path_says_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "case.nii.gz"
    with pytest.raises(VolumeReadError, match=f"{re.escape(str(path))}: file not found"):
        load_volume(path)
