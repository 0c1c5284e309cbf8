"""A served prediction's answer: the case's JSON row, and its mask in the format the scan came in.

The Predictor writes every mask as NIfTI (``scan.nii.gz``), the same file ``medseg predict``
writes; a NIfTI upload gets those bytes back (gunzipped for a ``.nii``), an NRRD or MetaImage
upload the same label map through SimpleITK (geometry kept), a PNG upload an 8-bit PNG of the
labels, and a DICOM series the NIfTI mask, or on request the DICOM SEG when highdicom is installed.
"""

from __future__ import annotations

import gzip
import io
import math
from enum import StrEnum
from pathlib import Path
from typing import Any

from medseg.serving.problems import Problem, scrub
from medseg.serving.uploads import ScanKind

#: Report columns that are server paths: never sent to a client.
PATH_COLUMNS = ("input",)


class Output(StrEnum):
    """What ``POST /predict`` answers with (``?output=``)."""

    MASK = "mask"  # the mask file as the body, the row in the X-Medseg-Row header (classification: the row)
    JSON = "json"  # the row alone
    DICOM_SEG = "dicom_seg"  # for a zipped DICOM series: the DICOM SEG as the body


def clean_row(row: dict[str, Any], *private: object) -> dict[str, Any]:
    """The row a client sees: status, error (server folders scrubbed), seconds and the task's values."""
    out: dict[str, Any] = {"status": row["status"], "error": scrub(str(row.get("error") or ""), *private),
                           "seconds": round(float(row.get("seconds") or 0.0), 4)}
    for key, value in dict(row.get("values") or {}).items():
        out[key] = None if isinstance(value, float) and not math.isfinite(value) else value
    return out


def mask_bytes(outputs: dict[str, str], kind: ScanKind, want: Output) -> tuple[bytes, str, str]:
    """The mask to send for a scan of ``kind``: (bytes, media type, file name).

    Raises:
        Problem: 422 when a DICOM SEG was asked for but none could be written.
    """
    nifti = Path(outputs["output"])
    if want == Output.DICOM_SEG:
        if kind != ScanKind.DICOM_ZIP:
            raise Problem(422, "a DICOM SEG answers a DICOM series only", "a zip of a DICOM series with output=dicom_seg",
                          f"a {kind.value} upload", "ask for output=mask (the mask in the scan's own format)")
        if "dicom_seg" not in outputs:
            raise Problem(422, "this server cannot write DICOM SEG", "highdicom installed on the server",
                          "no DICOM SEG written", "ask for output=mask (NIfTI), or the operator installs "
                          "'medseg[dicom-seg]'")
        return Path(outputs["dicom_seg"]).read_bytes(), "application/dicom", "mask.dcm"
    if kind in (ScanKind.NIFTI_GZ, ScanKind.DICOM_ZIP, ScanKind.DICOM):
        return nifti.read_bytes(), "application/gzip", "mask.nii.gz"
    if kind == ScanKind.NIFTI:
        return gzip.decompress(nifti.read_bytes()), "application/octet-stream", "mask.nii"
    if kind == ScanKind.PNG:
        return _png(nifti), "image/png", "mask.png"
    return _sitk(nifti, kind), "application/octet-stream", f"mask{kind.value}"


def _sitk(nifti: Path, kind: ScanKind) -> bytes:
    import tempfile

    import SimpleITK as sitk

    image = sitk.ReadImage(str(nifti))
    with tempfile.TemporaryDirectory(dir=nifti.parent) as folder:
        out = Path(folder) / f"mask{kind.value}"
        sitk.WriteImage(image, str(out), useCompression=True)
        return out.read_bytes()


def _png(nifti: Path) -> bytes:
    import nibabel as nib
    import numpy as np
    from PIL import Image

    labels = np.asarray(nib.load(str(nifti)).dataobj).squeeze()  # type: ignore[attr-defined]
    # medseg reads a PNG as (x = column, y = row): back to (rows, columns)
    pixels = np.ascontiguousarray(labels.T).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
