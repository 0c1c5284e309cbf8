"""DICOM SEG: label maps written as a SEG referencing the source series, and SEG files read back as
label maps (both need the optional ``highdicom``: ``pip install 'medseg[dicom-seg]'``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from monai.config import PathLike
from monai.utils import ensure_tuple

from medseg._version import __version__
from medseg.errors import VolumeReadError, cause_text
from medseg.io.atomic import atomic_path
from medseg.io.dicom_sniff import is_dicom_seg
from medseg.io.sitk_reader import SimpleITKReader

if TYPE_CHECKING:
    import SimpleITK as sitk

#: SOP Class UID of Segmentation Storage.


def dicom_seg_available() -> bool:
    return importlib.util.find_spec("highdicom") is not None


def read_dicom_seg(path: Path) -> sitk.Image:
    """A DICOM SEG as one integer label map: each voxel holds its segment number (0 = no segment).

    The grid is the one the SEG's frames define (highdicom's ``get_volume``): it matches the
    referenced series when the SEG has a frame for every slice. A SEG written with its empty frames
    left out covers only the slices from its first to its last segmented one, so its shape and
    origin then differ from the series'.

    Returns:
        A SimpleITK image (LPS, like every DICOM read here), ``uint8`` or ``uint16`` by the largest
        segment number; :class:`~medseg.io.sitk_reader.SimpleITKReader` turns it into RAS.

    Raises:
        VolumeReadError: highdicom is not installed, the SEG cannot be parsed, its frames do not
            form one regular volume, or its segments overlap (a label map cannot hold both).
    """
    if not dicom_seg_available():
        raise VolumeReadError(
            f"{path}: a DICOM SEG (segmentation); reading it needs highdicom. "
            "Install it with `pip install 'medseg[dicom-seg]'`, or convert the SEG to NIfTI.")
    import highdicom as hd

    try:
        seg = hd.seg.segread(path)
    except Exception as err:  # noqa: BLE001 - highdicom/pydicom raise many types on a damaged file
        raise VolumeReadError(f"{path}: not a readable DICOM SEG ({cause_text(err)}). Export it again.") from None
    numbers = [int(n) for n in seg.segment_numbers]
    dtype = np.uint8 if max(numbers, default=0) < 256 else np.uint16
    try:
        volume = seg.get_volume(combine_segments=True, relabel=False, dtype=dtype)
    except Exception as err:  # noqa: BLE001
        raise VolumeReadError(
            f"{path}: the DICOM SEG's frames cannot be read as one label volume ({cause_text(err)}). Expected: frames "
            "on one regular grid with non-overlapping segments. Convert the SEG with a tool that keeps each segment "
            "separately (e.g. dcmqi segimage2itkimage) and merge the labels yourself.") from None
    # highdicom: array (slice, row, column), affine index -> LPS. SimpleITK: array (z, y, x), x = column.
    array = np.asarray(volume.array)
    affine = np.asarray(volume.affine, dtype=np.float64)
    columns = affine[:3, [2, 1, 0]]  # the x (column), y (row), z (slice) steps in mm
    if array.shape[0] > 1 and float(np.cross(columns[:, 0], columns[:, 1]) @ columns[:, 2]) < 0:
        # highdicom may stack the frames against the slice normal; GDCM (and so the series read
        # here) stacks along it: flip, so SEG and series share one grid.
        affine[:3, 3] += (array.shape[0] - 1) * columns[:, 2]
        columns[:, 2] *= -1
        array = array[::-1]
    import SimpleITK as sitk  # here, not at import: 90 MB of library a NIfTI-only prediction never needs

    spacing = np.linalg.norm(columns, axis=0)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(v) for v in spacing])
    image.SetOrigin([float(v) for v in affine[:3, 3]])
    image.SetDirection([float(v) for v in (columns / spacing).ravel()])
    image.SetMetaData("modality", "SEG")
    image.SetMetaData("series_instance_uid", str(seg.SeriesInstanceUID))
    return image


class DicomSegReader(SimpleITKReader):
    """The reader of the ``dicom-seg`` input format: a DICOM SEG file as an integer label map
    (:func:`read_dicom_seg`), in RAS with the series' conventions like every DICOM read here."""

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(Path(name).is_file() and is_dicom_seg(Path(name)) for name in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> Sequence[sitk.Image] | sitk.Image:
        images = [read_dicom_seg(Path(name)) for name in ensure_tuple(data)]
        return images if len(images) > 1 else images[0]


def write_dicom_seg(label_map: np.ndarray, series_folder: Path, series_uid: str, labels: Mapping[int, str],
                    path: Path) -> Path:
    """Write a label map on a series' grid as a DICOM SEG that references that series.

    Args:
        label_map: (x, y, z) integers in the index order :class:`~medseg.io.readers.SimpleITKReader`
            gives the series (slices sorted by position).
        series_folder: the folder holding the source series.
        series_uid: its SeriesInstanceUID.
        labels: label value -> name; 0 is background and gets no segment.
        path: the ``.dcm`` to write (atomically).
    """
    import highdicom as hd
    import SimpleITK as sitk
    from pydicom.sr.codedict import codes

    # GDCM orders the files by slice position, exactly as the reader stacked them.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_folder), series_uid)
    sources = [pydicom.dcmread(f) for f in files]
    if len(sources) != label_map.shape[2]:
        raise ValueError(f"{series_folder}: {len(sources)} slices but the mask has {label_map.shape[2]}")
    frames = np.ascontiguousarray(np.transpose(label_map, (2, 1, 0))).astype(np.uint8)  # (z, rows=y, cols=x)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", version=__version__,
                                                   family=codes.cid7162.ArtificialIntelligence)
    segments = [
        hd.seg.SegmentDescription(
            segment_number=value, segment_label=name, segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for value, name in sorted(labels.items()) if value != 0
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=hd.UID(), series_number=900,
        sop_instance_uid=hd.UID(), instance_number=1, manufacturer="medseg", manufacturer_model_name="medseg",
        software_versions=__version__, device_serial_number="none", series_description="medseg prediction",
    )
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
