"""Helpers every task's case predictor uses: the error for an unreadable input, what the loader is
given, the model's input check, the NIfTI writer, voxel volumes and the process's peak memory."""

from __future__ import annotations

import logging
import resource
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import MetaTensor
from monai.data.utils import to_affine_nd

from medseg.data.transforms import IMAGE
from medseg.errors import (
    CaseError,
    MedsegError,
    cause_text,
    root_cause,
)
from medseg.io.atomic import atomic_path

log = logging.getLogger(__name__)


def read_error(path: Path | str, err: BaseException) -> CaseError:
    """The error for an input that could not be read or preprocessed, naming its root cause."""
    if isinstance(err, CaseError):
        return err
    cause = root_cause(err)
    if isinstance(cause, MedsegError):
        message = str(cause)
        return CaseError(message if f"{path}:" in message else f"{path}: {message}")
    return CaseError(f"{path}: could not be read or preprocessed ({cause_text(err)}). "
                     "Check that it is a complete NIfTI/DICOM/MHA/NRRD image")


def reader_source(image: Any) -> str | list[str]:
    """What the loader takes for an input (a path, or a sequence of channel files): one path, or a
    list of channel files (read as channels)."""
    if isinstance(image, (str, Path)):
        return str(image)
    paths = [str(p) for p in image]
    return paths if len(paths) > 1 else paths[0]


def preprocess_case(chains: Mapping[bool, Callable[[dict], dict]], image: Any, case_id: str,
                    contract: dict[str, Any]) -> tuple[MetaTensor, str]:
    """One input through the model's preprocessing: read first (``chains[True]``) unless it is already a
    loaded image (``chains[False]``), then checked against the contract's input shape.

    Returns:
        The preprocessed image, and the input as messages name it.

    Raises:
        CaseError: the input could not be read or preprocessed (naming it and the root cause), or its
            shape is not what the model takes.
    """
    loaded = isinstance(image, MetaTensor)
    source = case_id if loaded else shown_source(image)
    try:
        data = chains[not loaded]({IMAGE: image if loaded else reader_source(image)})
    except Exception as err:
        raise read_error(source, err) from err
    volume: MetaTensor = data[IMAGE]
    check_input_shape(contract, volume.shape, source)
    return volume, source


def shown_source(image: Any) -> str:
    """An input as messages name it (channel files joined by ``;``)."""
    return str(image) if isinstance(image, (str, Path)) else ";".join(str(p) for p in image)


def check_input_shape(contract: dict[str, Any], shape: Sequence[int], source: str) -> None:
    """Refuse an image whose channels or dimensions are not what the model takes.

    Raises:
        CaseError: names the input, what the model expects and what it got.
    """
    channels, spatial = int(shape[0]), tuple(int(s) for s in shape[1:])
    if channels != contract["in_channels"]:
        raise CaseError(f"{source}: the model expects {contract['in_channels']} channel(s) "
                        f"{contract['channel_names']}, got {channels} (shape {tuple(shape)}); give one file per case "
                        "with the channels the model was trained on")
    dims = contract["spatial_dims"]
    real_dims = sum(s > 1 for s in spatial)
    if len(spatial) != dims or real_dims < dims:
        raise CaseError(f"{source}: a {real_dims}D image (spatial shape {spatial}) given to a {dims}D model; "
                        f"use a {dims}D scan (a DICOM series folder rather than one slice, for instance)")


def write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    """Write a NIfTI with qform and sform set to ``affine`` (RAS), atomically (2D affines are padded)."""
    affine = np.asarray(to_affine_nd(3, affine), dtype=np.float64)
    img = nib.Nifti1Image(array, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    with atomic_path(path, suffix=".nii.gz") as tmp:
        nib.save(img, tmp)
    return path


def voxel_volume_ml(affine: np.ndarray, spatial_dims: int) -> float:
    """Volume of one voxel in mL (for 2D images: area in mm² / 1000)."""
    a = np.asarray(affine, dtype=np.float64)
    d = min(spatial_dims, a.shape[0] - 1)
    return abs(float(np.linalg.det(a[:d, :d]))) / 1000.0


def mean_or_none(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB.

    ``VmHWM`` first: ``ru_maxrss`` survives fork+exec, so a process started by a big parent
    would report the parent's peak instead of its own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def portable_history(volume: MetaTensor) -> MetaTensor:
    """``volume`` with a transform history that names no transform object of this process.

    MONAI inverts a transform only if the history entry carries that transform's ``id()`` (or
    ``TraceKeys.NONE``); another process's identical chain has other ids, so an entry is given
    ``NONE`` and the inverse matches transforms by their order, as the chain applied them.
    """
    from monai.utils import TraceKeys

    def detached(entry: Any) -> Any:
        if isinstance(entry, dict):
            return {k: TraceKeys.NONE if k == TraceKeys.ID else detached(v) for k, v in entry.items()}
        if isinstance(entry, (list, tuple)):
            return type(entry)(detached(v) for v in entry)
        return entry

    volume.applied_operations = [detached(op) for op in volume.applied_operations]
    return volume
