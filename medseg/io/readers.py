"""One entry point for volumes: MONAI ``LoadImage(d)`` reading through medseg's format registry.

Every file goes to the reader :data:`medseg.io.formats.FORMATS` names for it: NIfTI through
MONAI's ``NibabelReader``; DICOM (files, multi-frame, series folders), MetaImage and NRRD through
:class:`~medseg.io.sitk_reader.SimpleITKReader`; and whatever a plugin registered. Every reader
returns the affine in RAS, so geometry means the same whatever the format.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import MetaTensor
from monai.transforms import LoadImage, LoadImaged
from monai.utils import ensure_tuple

from medseg.errors import VolumeReadError, cause_text, medseg_cause
from medseg.io.dicom_sniff import is_dicom_file
from medseg.io.formats import FORMATS, RegistryReader, strip_volume_suffix
from medseg.io.sitk_reader import SimpleITKReader, lps_to_ras, read_dicom_series, sitk_affine

__all__ = [
    "FORMATS", "SimpleITKReader", "VolumeReadError", "is_dicom_file", "load_volume", "lps_to_ras",
    "make_load_transform", "read_dicom_series", "sitk_affine", "strip_volume_suffix",
]


def make_load_transform(keys: Sequence[str], allow_missing_keys: bool = False,
                        dtype: Any = np.float32) -> LoadImaged:
    """``LoadImaged`` that reads every file through the format registry (:class:`RegistryReader`);
    ``dtype=None`` keeps the values as the reader gives them (a CT's int16: half of float32)."""
    loader = LoadImaged(keys=keys, image_only=True, ensure_channel_first=True, allow_missing_keys=allow_missing_keys,
                        dtype=dtype)
    loader.register(RegistryReader())
    return loader


_LOADER: LoadImage | None = None


def load_volume(path: PathLike | Sequence[PathLike]) -> MetaTensor:
    """Read a volume (or several channel files) as a channel-first ``MetaTensor`` with a RAS affine.

    Args:
        path: a file of a registered format (NIfTI, DICOM, MHA, NRRD, ...), a DICOM series folder,
            or a list of such (channels).

    Raises:
        VolumeReadError: missing, unreadable or corrupt input; the message names the file.
    """
    global _LOADER
    if _LOADER is None:
        _LOADER = LoadImage(image_only=True, ensure_channel_first=True)
        _LOADER.register(RegistryReader())
    paths = [Path(p) for p in ensure_tuple(path)]
    for p in paths:
        if not p.exists():
            raise VolumeReadError(f"{p}: file not found. Check the path and the data root it is relative to.")
    try:
        return _LOADER(paths if len(paths) > 1 else paths[0])
    except Exception as err:  # readers raise many types; the user needs the file and the cause
        known = medseg_cause(err)
        if known is not None:
            raise known from err
        names = ", ".join(str(p) for p in paths)
        raise VolumeReadError(
            f"{names}: could not be read as an image ({cause_text(err)}). "
            f"Check that the file is complete (not truncated) and is one of: {FORMATS.describe()}."
        ) from err
