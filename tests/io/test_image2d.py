"""2D image files (PNG, JPEG, TIFF) through the format registry: channels, bit depths, orientation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.data.medmnist import _write_image
from medseg.errors import VolumeReadError
from medseg.io.formats import FORMATS
from medseg.io.readers import load_volume


def _grey(shape: tuple[int, int] = (13, 21), seed: int = 0, dtype: type = np.uint8) -> np.ndarray:
    high = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, high, size=shape, endpoint=True).astype(dtype)


def test_png_suffixes_are_the_image2d_format() -> None:
    for name in ("a.png", "a.JPG", "a.jpeg", "a.tif", "a.TIFF"):
        fmt = FORMATS.by_suffix(name)
        assert fmt is not None and fmt.name == "image2d", name


def test_grey_png_is_one_channel_columns_first_with_identity_affine(tmp_path: Path) -> None:
    pixels = _grey()
    Image.fromarray(pixels).save(tmp_path / "g.png")
    volume = load_volume(tmp_path / "g.png")
    assert tuple(volume.shape) == (1, 21, 13)  # (C, W, H): x = column, y = row
    np.testing.assert_array_equal(volume[0].numpy(), pixels.T)
    np.testing.assert_array_equal(volume[0, :, 0].numpy(), pixels[0])  # array[:, 0] is the top row
    np.testing.assert_allclose(volume.affine.numpy(), np.eye(4))
    assert volume.meta["original_channel_dim"] == "no_channel"
    assert tuple(volume.meta["spatial_shape"]) == (21, 13)


def test_16bit_png_keeps_its_values(tmp_path: Path) -> None:
    pixels = _grey(seed=1, dtype=np.uint16)
    Image.fromarray(pixels).save(tmp_path / "g16.png")
    volume = load_volume(tmp_path / "g16.png")
    assert int(volume.max()) == int(pixels.max()) > 255
    np.testing.assert_array_equal(volume[0].numpy(), pixels.T)


@pytest.mark.parametrize("mode", ["RGB", "RGBA"])
def test_rgb_and_rgba_are_three_channels_alpha_dropped(tmp_path: Path, mode: str) -> None:
    rgb = np.random.default_rng(2).integers(0, 256, size=(9, 14, len(mode)), dtype=np.uint8)
    Image.fromarray(rgb, mode=mode).save(tmp_path / "c.png")
    volume = load_volume(tmp_path / "c.png")
    assert tuple(volume.shape) == (3, 14, 9)
    np.testing.assert_array_equal(volume.numpy(), np.transpose(rgb[..., :3], (2, 1, 0)))


def test_grey_with_alpha_is_one_grey_channel(tmp_path: Path) -> None:
    la = np.stack([_grey((7, 8), seed=3), np.full((7, 8), 255, np.uint8)], axis=-1)
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    volume = load_volume(tmp_path / "la.png")
    assert tuple(volume.shape) == (1, 8, 7)
    np.testing.assert_array_equal(volume[0].numpy(), la[..., 0].T)


def test_jpeg_reads(tmp_path: Path) -> None:
    Image.fromarray(_grey(seed=4)).save(tmp_path / "g.jpg", quality=95)
    assert tuple(load_volume(tmp_path / "g.jpg").shape) == (1, 21, 13)


def test_float_tiff_reads(tmp_path: Path) -> None:
    pixels = np.random.default_rng(5).normal(size=(11, 6)).astype(np.float64)  # Pillow has no float64 mode
    tifffile.imwrite(tmp_path / "f.tif", pixels)
    volume = load_volume(tmp_path / "f.tif")
    np.testing.assert_allclose(volume[0].numpy(), pixels.T, rtol=1e-6)


def test_multi_page_tiff_is_refused(tmp_path: Path) -> None:
    stack = np.random.default_rng(6).integers(0, 255, size=(4, 8, 9), dtype=np.uint8)
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, stack, photometric="minisblack", metadata=None)  # one page per slice
    with pytest.raises(VolumeReadError, match=r"Expected one 2D image.*Got 4 pages.*File: .*stack\.tif"):
        load_volume(path)


def test_a_png_that_is_not_a_png_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.png").write_text("not an image")
    with pytest.raises(VolumeReadError, match=r"bad\.png: not a readable PNG image"):
        load_volume(tmp_path / "bad.png")


def test_png_loads_like_the_medmnist_nifti_of_the_same_array(tmp_path: Path) -> None:
    """A PNG saved from a MedMNIST array and medseg's NIfTI import of it give one tensor."""
    pixels = _grey((28, 28), seed=7)
    pixels[0, :5] = 255  # a mark in the top-left corner, so a flip or transpose would show
    Image.fromarray(pixels).save(tmp_path / "s.png")
    _write_image(tmp_path / "s.nii", pixels, 2, 1)
    png, nifti = load_volume(tmp_path / "s.png"), load_volume(tmp_path / "s.nii")
    assert tuple(png.shape) == tuple(nifti.shape)
    np.testing.assert_array_equal(png.numpy(), nifti.numpy())
    np.testing.assert_allclose(png.affine.numpy(), nifti.affine.numpy())


def test_grey_channel_files_stack(tmp_path: Path) -> None:
    a, b = _grey(seed=8), _grey(seed=9)
    Image.fromarray(a).save(tmp_path / "x_0000.png")
    Image.fromarray(b).save(tmp_path / "x_0001.png")
    volume = load_volume([tmp_path / "x_0000.png", tmp_path / "x_0001.png"])
    assert tuple(volume.shape) == (2, 21, 13)
    np.testing.assert_array_equal(volume[1].numpy(), b.T)
