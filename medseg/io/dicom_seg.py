"""DICOM SEG output referencing the source series (needs the optional ``highdicom``)."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk

import medseg
from medseg.io.atomic import atomic_path


def dicom_seg_available() -> bool:
    return importlib.util.find_spec("highdicom") is not None


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
    from pydicom.sr.codedict import codes

    # GDCM orders the files by slice position, exactly as the reader stacked them.
    files = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_folder), series_uid)
    sources = [pydicom.dcmread(f) for f in files]
    if len(sources) != label_map.shape[2]:
        raise ValueError(f"{series_folder}: {len(sources)} slices but the mask has {label_map.shape[2]}")
    frames = np.ascontiguousarray(np.transpose(label_map, (2, 1, 0))).astype(np.uint8)  # (z, rows=y, cols=x)
    algorithm = hd.AlgorithmIdentificationSequence(name="medseg", version=medseg.__version__,
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
        software_versions=medseg.__version__, device_serial_number="none", series_description="medseg prediction",
    )
    with atomic_path(path, suffix=".dcm") as tmp:
        seg.save_as(tmp)
    return path
