"""Is this file DICOM, and is it a DICOM SEG? Header bytes only, so every reader and check can ask first.

Kept apart from the readers: the SimpleITK reader, the SEG reader and the header preflight all
ask these questions, and none of them should have to import another to do so.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

#: SOP Class UID of Segmentation Storage.
SEG_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.66.4"


def is_dicom_file(path: Path) -> bool:
    """True for a file with the DICOM preamble magic ``DICM`` at byte 128."""
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def is_dicom_seg(path: Path) -> bool:
    """True for a DICOM file whose SOP Class UID is Segmentation Storage (reads the header only)."""
    path = Path(path)
    if not path.is_file() or not is_dicom_file(path):
        return False
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # noqa: BLE001 - a damaged header is reported by the image reader
        return False
    return str(header.get("SOPClassUID", "")) == SEG_SOP_CLASS_UID
