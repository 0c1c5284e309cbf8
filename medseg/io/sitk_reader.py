"""SimpleITK behind MONAI's ``ImageReader`` interface: DICOM series folders, single and
multi-frame DICOM files, MetaImage and NRRD (a DICOM SEG file is a format of its own:
:class:`medseg.io.dicom_seg.DicomSegReader`).

The affine comes back in RAS, like MONAI's ``NibabelReader``, so geometry means the same whatever
the format; series folders are read by :func:`medseg.io.dicom_series.read_dicom_series`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader
from monai.utils import ensure_tuple
from monai.utils.enums import MetaKeys, SpaceKeys

from medseg.errors import VolumeReadError
from medseg.io.dicom_series import DICOM_TAGS, read_dicom_series
from medseg.io.dicom_sniff import is_dicom_file

if TYPE_CHECKING:
    import SimpleITK as sitk

#: File suffixes this reader handles (NIfTI stays with MONAI's nibabel reader).
SITK_SUFFIXES = (".dcm", ".dicom", ".ima", ".mha", ".mhd", ".nrrd", ".nhdr")



def lps_to_ras(affine: np.ndarray) -> np.ndarray:
    """Flip the first two world axes: DICOM/ITK patient space (LPS) to NIfTI/MONAI (RAS)."""
    flip = np.diag([-1.0, -1.0] + [1.0] * (affine.shape[0] - 2))
    return flip @ affine


def sitk_affine(image: sitk.Image) -> np.ndarray:
    """Voxel-index -> RAS-world affine of a SimpleITK image (index order x, y, z)."""
    dim = image.GetDimension()
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)
    spacing = np.asarray(image.GetSpacing(), dtype=np.float64)
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = direction @ np.diag(spacing)
    affine[:dim, dim] = image.GetOrigin()
    if dim < 2:
        return affine
    return lps_to_ras(affine)


class SimpleITKReader(ImageReader):
    """MONAI ``ImageReader`` backed by SimpleITK: DICOM series folders and files, MHA, NRRD.

    Arrays come out in (x, y, z[, c]) index order to match the RAS affine, like MONAI's
    ``ITKReader`` but without the ``itk`` dependency.
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(self._handles(Path(name)) for name in ensure_tuple(filename))

    @staticmethod
    def _handles(path: Path) -> bool:
        if path.is_dir():
            return True
        name = path.name.lower()
        if name.endswith(SITK_SUFFIXES):
            return True
        return not name.endswith((".nii", ".nii.gz")) and path.is_file() and is_dicom_file(path)

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Sequence[sitk.Image] | sitk.Image:
        images = [self._read_one(Path(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]

    @staticmethod
    def _read_one(path: Path) -> sitk.Image:
        import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs
        if path.is_dir():
            return read_dicom_series(path)
        image = sitk.ReadImage(str(path))
        if is_dicom_file(path):
            reader = sitk.ImageFileReader()
            reader.SetFileName(str(path))
            reader.ReadImageInformation()
            for tag, key in DICOM_TAGS.items():
                if reader.HasMetaDataKey(tag):
                    image.SetMetaData(key, reader.GetMetaData(tag).strip())
        return image

    def get_data(self, img: Sequence[sitk.Image] | sitk.Image) -> tuple[np.ndarray, dict]:
        import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs
        arrays: list[np.ndarray] = []
        meta: dict[str, Any] = {}
        images = [img] if isinstance(img, sitk.Image) else list(img)  # sitk.Image is itself iterable
        for image in images:
            array = sitk.GetArrayFromImage(image)  # (z, y, x[, c]) -> (x, y, z[, c])
            dim = image.GetDimension()
            spatial = tuple(reversed(range(dim)))
            order = spatial + tuple(range(dim, array.ndim))
            array = np.ascontiguousarray(array.transpose(order))
            header: dict[str, Any] = {
                key: image.GetMetaData(key) for key in (*DICOM_TAGS.values(), "dicom_num_files") if image.HasMetaDataKey(key)
            }
            header[MetaKeys.ORIGINAL_AFFINE] = sitk_affine(image)
            header[MetaKeys.AFFINE] = header[MetaKeys.ORIGINAL_AFFINE].copy()
            header[MetaKeys.SPACE] = SpaceKeys.RAS
            header[MetaKeys.SPATIAL_SHAPE] = np.asarray(image.GetSize())
            header[MetaKeys.ORIGINAL_CHANNEL_DIM] = float("nan") if array.ndim == dim else -1
            if arrays:
                _check_same_grid(meta, header)
            else:
                meta = header
            arrays.append(array)
        if len(arrays) == 1:
            return arrays[0], meta
        meta[MetaKeys.ORIGINAL_CHANNEL_DIM] = 0
        return np.stack(arrays, axis=0), meta


def _check_same_grid(first: dict[str, Any], other: dict[str, Any]) -> None:
    if not np.array_equal(first[MetaKeys.SPATIAL_SHAPE], other[MetaKeys.SPATIAL_SHAPE]) or not np.allclose(
        first[MetaKeys.AFFINE], other[MetaKeys.AFFINE], atol=1e-4
    ):
        raise VolumeReadError(
            "Channels are not on one grid: shapes "
            f"{first[MetaKeys.SPATIAL_SHAPE].tolist()} vs {other[MetaKeys.SPATIAL_SHAPE].tolist()}, affines "
            f"{np.round(first[MetaKeys.AFFINE], 4).tolist()} vs {np.round(other[MetaKeys.AFFINE], 4).tolist()}. "
            "Resample every channel onto the first channel's grid before training."
        )
