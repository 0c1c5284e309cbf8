"""2D image files (PNG, JPEG, TIFF) behind MONAI's ``ImageReader`` interface, through Pillow.

Axis order: the array comes out as (x, y[, c]) with x the *column* and y the *row* (so
``array[:, 0]`` is the top row), with an identity RAS affine (4x4, 1 unit per pixel). That is the
order MONAI's own ``PILReader`` uses (``reverse_indexing=True``) and the one
:mod:`medseg.data.medmnist` writes its grey NIfTI in (``image.T`` with an identity affine), so
a PNG saved from a MedMNIST array and the NIfTI imported from it load to the same
``(C, W, H)`` tensor.

Channels:

==============================  ======================================================
Pillow mode                     channels
==============================  ======================================================
``1``, ``L``, ``I;16*``, ``I``  1 (grey; 8, 16 or 32-bit integers as stored)
``F``                           1 (32-bit float)
``LA``                          1 (grey; the alpha channel is dropped)
``P``, ``PA``                   1 (the palette *index*: label masks are stored this way)
``RGB``, ``RGBA``, others       3 (RGB; alpha dropped; CMYK, YCbCr, ... converted to RGB)
==============================  ======================================================

A TIFF that Pillow cannot decode (float RGB, 64-bit floats, some compressions) is read with
``tifffile``. A multi-page TIFF (a stack or a time series) is refused: medseg cannot tell
whether its pages are slices, channels or frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.utils import ensure_tuple
from monai.utils.enums import MetaKeys, SpaceKeys

from medseg.errors import VolumeReadError, cause_text

#: File suffixes of 2D images (lower case).
IMAGE2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
_TIFF = (".tif", ".tiff")
_INDEX_MODES = ("1", "L", "I", "F", "P", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class Image2DHeader:
    """What a 2D image file's header says: (width, height), channels in the file, bytes per value, pages."""

    size: tuple[int, int]
    channels: int
    itemsize: int
    pages: int


def _is_tiff(path: Path) -> bool:
    return path.name.lower().endswith(_TIFF)


def read_header(path: Path) -> Image2DHeader:
    """The header of a PNG/JPEG/TIFF file, without decoding its pixels.

    Raises:
        VolumeReadError: not a readable image, or a multi-page TIFF.
    """
    from PIL import Image

    path = Path(path)
    try:
        with Image.open(path) as im:
            pages = int(getattr(im, "n_frames", 1))
            bands = len(im.getbands())
            itemsize = {"I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2, "I": 4, "F": 4}.get(im.mode, 1)
            header = Image2DHeader((int(im.size[0]), int(im.size[1])), bands, itemsize, pages)
    except Exception as err:  # noqa: BLE001 - Pillow raises many types (UnidentifiedImageError, OSError, bomb errors)
        if not _is_tiff(path):
            raise VolumeReadError(
                f"{path}: not a readable {_kind(path)} image ({cause_text(err)}). It is truncated, corrupt or another "
                "kind of file under this name; export it again.") from None
        header = _tifffile_header(path, err)
    if header.pages > 1:
        raise VolumeReadError(
            f"{path}: Expected one 2D image. Got {header.pages} pages (a multi-page TIFF: a stack, a time series or "
            f"several channels). File: {path}. Save each page as its own file, or convert the stack to a 3D volume "
            "(e.g. NIfTI) if the pages are slices.")
    return header


def _tifffile_header(path: Path, pillow_error: BaseException) -> Image2DHeader:
    try:
        import tifffile
    except ImportError:
        raise VolumeReadError(
            f"{path}: Pillow cannot read this TIFF ({cause_text(pillow_error)}); install tifffile "
            "(`pip install tifffile`) to read float and other scientific TIFFs.") from None
    try:
        with tifffile.TiffFile(path) as tif:
            pages = len(tif.pages)
            page = tif.pages[0]
            shape = tuple(int(s) for s in page.shape)
            dtype = np.dtype(page.dtype)
    except Exception as err:  # noqa: BLE001 - tifffile raises many types on a damaged file
        raise VolumeReadError(
            f"{path}: not a readable TIFF image (Pillow: {cause_text(pillow_error)}; tifffile: {cause_text(err)}). "
            "It is truncated, corrupt or another kind of file under this name; export it again.") from None
    if len(shape) == 2:
        return Image2DHeader((shape[1], shape[0]), 1, dtype.itemsize, pages)
    if len(shape) == 3 and shape[-1] <= 4:
        return Image2DHeader((shape[1], shape[0]), shape[-1], dtype.itemsize, pages)
    raise VolumeReadError(
        f"{path}: Expected one 2D image (height x width, optionally x 1-4 samples). Got a TIFF page of shape {shape}. "
        f"File: {path}. Save it as one 2D image per file.")


def _kind(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(suffix, "TIFF")


def _pixels(path: Path) -> np.ndarray:
    """The pixels as (rows, columns[, channels]) after the channel rules of the module docstring."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            opened.load()
            im: Image.Image = opened
            if im.mode in ("LA", "PA"):
                im = im.getchannel(0)
            if im.mode == "1":
                return np.asarray(im, dtype=np.uint8)
            if im.mode in _INDEX_MODES:
                array = np.asarray(im)
                return array.astype(array.dtype.newbyteorder("="), copy=False)
            if im.mode not in ("RGB", "RGBA"):
                im = im.convert("RGB")
            return np.asarray(im)[..., :3]
    except VolumeReadError:
        raise
    except Exception as err:  # noqa: BLE001 - decoding errors come in many types
        if not _is_tiff(path):
            raise VolumeReadError(
                f"{path}: the {_kind(path)} pixel data cannot be decoded ({cause_text(err)}); the file is probably "
                "truncated. Export or copy it again.") from None
        return _tifffile_pixels(path, err)


def _tifffile_pixels(path: Path, pillow_error: BaseException) -> np.ndarray:
    import tifffile

    try:
        array = np.asarray(tifffile.imread(path, key=0))
    except Exception as err:  # noqa: BLE001
        raise VolumeReadError(
            f"{path}: the TIFF pixel data cannot be decoded (Pillow: {cause_text(pillow_error)}; tifffile: "
            f"{cause_text(err)}). Export it again, uncompressed.") from None
    if array.ndim == 3:
        array = array[..., 0] if array.shape[-1] in (1, 2) else array[..., :3]
    return array


class Image2DReader(ImageReader):
    """MONAI ``ImageReader`` for PNG, JPEG and TIFF: a channel-last (x, y[, c]) array, identity RAS affine.

    See the module docstring for the axis order and the channel rules.
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(str(name).lower().endswith(IMAGE2D_SUFFIXES) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> list[tuple[Path, np.ndarray]]:
        out = []
        for name in ensure_tuple(data):
            path = Path(name)
            read_header(path)  # refuses multi-page TIFFs before decoding anything
            out.append((path, _pixels(path)))
        return out

    def get_data(self, img: list[tuple[Path, np.ndarray]]) -> tuple[np.ndarray, dict]:
        arrays: list[np.ndarray] = []
        meta: dict[str, Any] = {}
        for path, pixels in img:
            array = np.ascontiguousarray(np.swapaxes(pixels, 0, 1))  # (rows, cols[, c]) -> (x = col, y = row[, c])
            header = {
                # 4x4 like MONAI's NIfTI reader gives a 2D NIfTI, so both load to the same MetaTensor
                MetaKeys.ORIGINAL_AFFINE: np.eye(4),
                MetaKeys.AFFINE: np.eye(4),
                MetaKeys.SPACE: SpaceKeys.RAS,
                MetaKeys.SPATIAL_SHAPE: np.asarray(array.shape[:2]),
                MetaKeys.ORIGINAL_CHANNEL_DIM: -1 if array.ndim == 3 else "no_channel",
                "spacing": np.ones(2),
            }
            if arrays and (tuple(array.shape[:2]) != tuple(arrays[0].shape[:2])):
                raise VolumeReadError(
                    f"channel files are not one size: {img[0][0]} is {arrays[0].shape[0]} x {arrays[0].shape[1]} "
                    f"pixels, {path} is {array.shape[0]} x {array.shape[1]} (width x height). Resize them to one size.")
            if not arrays:
                meta = header
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        stacked = [a if a.ndim == 3 else a[..., None] for a in arrays]
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = -1
        return np.concatenate(stacked, axis=-1), meta
