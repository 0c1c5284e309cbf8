"""Hostile input files, and the promise every one of them must keep.

The promise (README, "Reliability"): a file medseg is given is either read into an image with a
usable geometry, or refused with a :class:`~medseg.errors.MedsegError` whose message names the
file and says what is wrong; never another exception, never MONAI's "applying transform <object
at 0x...>", never an allocation the header made up.
"""

from __future__ import annotations

import gzip
import json
import random
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

from medseg.errors import MedsegError
from medseg.io.preflight import check_values
from medseg.io.readers import load_volume
from tests.conftest import TCIA

#: Memory the fuzz tests tell medseg the machine has: a header claiming more than half of it must be
#: refused before anything is allocated (see ``medseg.io.preflight.available_memory``).
FUZZ_MEMORY_BYTES = 512 * 2**20
#: What a refusal's message must never contain: the wrapper's words instead of the cause.
WRAPPER_WORDS = ("applying transform", "object at 0x", "Traceback")


@dataclass
class Tally:
    """How many hostile inputs were tried, by class and outcome (written to the fuzz report)."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)
    escapes: list[str] = field(default_factory=list)

    def add(self, kind: str, outcome: str) -> None:
        self.outcomes[(kind, outcome)] += 1

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    def as_dict(self) -> dict[str, object]:
        by_kind: dict[str, dict[str, int]] = {}
        for (kind, outcome), n in sorted(self.outcomes.items()):
            by_kind.setdefault(kind, {})[outcome] = n
        return {"inputs_tried": self.total, "escapes": len(self.escapes), "escape_examples": self.escapes[:20],
                "by_class": by_kind}


TALLY = Tally()


def keeps_promise(path: Path, kind: str, names: str | None = None) -> str:
    """Read ``path`` as medseg does (registry reader, then the value checks of every chain).

    Returns:
        "read" or "refused" (also counted in :data:`TALLY` under ``kind``).

    Raises:
        AssertionError: an escape: another exception type, a message that does not name the file
            or that is the wrapper's, or an image with an unusable geometry.
    """
    names = names or path.name
    try:
        try:
            image = load_volume(path)
            check_values(image, str(path))
        except MedsegError as err:
            message = str(err)
            assert names in message, f"{path}: the message does not name the file: {message}"
            assert not any(w in message for w in WRAPPER_WORDS), f"{path}: wrapper text in: {message}"
            assert len(message) > len(str(path)) + 30, f"{path}: a message too short to say what and why: {message}"
            TALLY.add(kind, "refused")
            return "refused"
        affine = np.asarray(image.affine)
        assert np.all(np.isfinite(affine)), f"{path}: read with a non-finite affine {affine.tolist()}"
        assert all(int(s) >= 1 for s in image.shape), f"{path}: read with shape {tuple(image.shape)}"
        TALLY.add(kind, "read")
        return "read"
    except AssertionError as err:
        TALLY.add(kind, "escape")
        TALLY.escapes.append(f"{kind}: {err}")
        raise
    except BaseException as err:  # noqa: BLE001 - that is the point: anything else escaped
        TALLY.add(kind, "escape")
        TALLY.escapes.append(f"{kind}: {path.name}: {type(err).__name__}: {str(err)[:200]}")
        raise AssertionError(f"{path}: escaped as {type(err).__name__}: {err}") from err


def write_report(path: Path) -> None:
    """The fuzz report (JSON and a Markdown table beside it), written by ``make fuzz``."""
    import platform
    import subprocess
    import time

    import medseg

    commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True).stdout.strip()
    data = {"command": "make fuzz", "date": time.strftime("%Y-%m-%d"), "commit": commit,
            "medseg_version": medseg.__version__, "python": platform.python_version(), **TALLY.as_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    lines = ["# Fuzz suite: hostile inputs tried", "",
             f"Written by `make fuzz` (the whole of `tests/fuzz`, fast and slow parts) on {data['date']} (commit "
             f"{commit}). {TALLY.total} inputs tried, "
             f"**{len(TALLY.escapes)} escapes** (an escape: an exception other than medseg's own error, a message "
             "that does not name the file, MONAI's wrapper text, or an image read with an unusable geometry).", "",
             "| class | outcomes | escapes |", "|---|---|---|"]
    for kind, counts in data["by_class"].items():  # type: ignore[union-attr]
        shown = ", ".join(f"{outcome} {n}" for outcome, n in counts.items() if outcome != "escape")
        lines.append(f"| {kind} | {shown} | {counts.get('escape', 0)} |")
    lines += ["", "Outcomes: *read* (an image with a usable geometry), *refused* (medseg's error naming the file), and "
              "for whole batches *failed alone* (that case failed with its message, the others went on), "
              "*predicted*, *refused or done* (a concurrent predict), *skipped by discovery*. Bit flips inside "
              "pixel data of formats without checksums (NIfTI, DICOM, MHA, NRRD) read as other values: "
              "nothing in the file can tell them apart; gzip's CRC catches them in `.nii.gz`."]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------------- writers


def good_volume(seed: int, shape: tuple[int, ...] = (9, 11, 7)) -> np.ndarray:
    return np.random.default_rng(seed).normal(100.0, 20.0, shape).astype(np.float32)


def raw_nifti(path: Path, data: np.ndarray | None, *, shape: tuple[int, ...] | None = None,
              datatype: int | None = None, pixdim: list[float] | None = None, srow: np.ndarray | None = None,
              qform_code: int = 0, sform_code: int = 1, vox_offset: float = 352.0, payload: bytes | None = None) -> Path:
    """A NIfTI-1 file written byte by byte, so its header can say anything (nibabel would refuse or fix it)."""
    header = nib.Nifti1Header()
    source = data if data is not None else np.zeros((1,), np.float32)
    header.set_data_dtype(source.dtype)
    dims = list(shape if shape is not None else source.shape)
    header["dim"] = [len(dims), *dims, *[1] * (7 - len(dims))]
    if datatype is not None:
        header["datatype"] = datatype
    affine = np.eye(4) if srow is None else srow
    if pixdim is None and np.all(np.isfinite(affine)):  # consistent with the sform, as writers make them
        pixdim = [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)]
    header["pixdim"] = ([1.0, *(pixdim or [])] + [1.0] * 8)[:8]
    header["srow_x"], header["srow_y"], header["srow_z"] = affine[0], affine[1], affine[2]
    header["sform_code"], header["qform_code"] = sform_code, qform_code
    header["vox_offset"] = vox_offset
    body = payload if payload is not None else source.tobytes(order="F")
    blob = header.binaryblock + b"\0" * 4 + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(blob, compresslevel=1) if path.name.endswith(".gz") else blob)
    return path


def metaimage(path: Path, data: np.ndarray, *, dim_size: tuple[int, ...] | None = None,
              element_type: str = "MET_FLOAT", spacing: tuple[float, ...] | None = None,
              matrix: tuple[float, ...] | None = None, payload: bytes | None = None) -> Path:
    """A ``.mha`` with a hand-written header (``DimSize`` etc. may lie about the data after it)."""
    dims = dim_size if dim_size is not None else tuple(reversed(data.shape))
    n = len(dims)
    lines = ["ObjectType = Image", f"NDims = {n}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
             "CompressedData = False",
             f"TransformMatrix = {' '.join(str(v) for v in (matrix or np.eye(n).ravel()))}",
             "Offset = " + " ".join("0" for _ in range(n)),
             f"ElementSpacing = {' '.join(str(v) for v in (spacing or (1.0,) * n))}",
             f"DimSize = {' '.join(str(d) for d in dims)}", f"ElementType = {element_type}",
             "ElementDataFile = LOCAL"]
    body = payload if payload is not None else np.ascontiguousarray(data).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n").encode() + body)
    return path


def nrrd(path: Path, data: np.ndarray, *, sizes: tuple[int, ...] | None = None, type_name: str = "float",
         directions: list[tuple[float, ...]] | None = None, payload: bytes | None = None) -> Path:
    """A raw-encoded ``.nrrd`` with a hand-written header."""
    dims = sizes if sizes is not None else tuple(reversed(data.shape))
    n = len(dims)
    dirs = directions or [tuple(1.0 if i == j else 0.0 for j in range(n)) for i in range(n)]
    lines = ["NRRD0004", f"type: {type_name}", f"dimension: {n}", "space: left-posterior-superior",
             f"sizes: {' '.join(str(d) for d in dims)}",
             "space directions: " + " ".join("(" + ",".join(str(v) for v in d) + ")" for d in dirs),
             "endian: little", "encoding: raw", "space origin: (" + ",".join("0" for _ in range(n)) + ")"]
    body = payload if payload is not None else np.ascontiguousarray(data).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(("\n".join(lines) + "\n\n").encode() + body)
    return path


def sitk_file(path: Path, data: np.ndarray, spacing: tuple[float, ...] = (0.8, 0.9, 2.5)) -> Path:
    """A well-formed file of any SimpleITK format (MHA, NRRD, DICOM) to damage afterwards."""
    image = sitk.GetImageFromArray(data)
    image.SetSpacing(spacing[: data.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def good_files(folder: Path, seed: int) -> dict[str, Path]:
    """One well-formed file per supported single-file format."""
    data = good_volume(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    img = nib.Nifti1Image(data, np.diag([0.8, 0.9, 2.5, 1.0]))
    for suffix in (".nii", ".nii.gz"):
        out[suffix] = folder / f"good{suffix}"
        nib.save(img, out[suffix])
    out[".mha"] = sitk_file(folder / "good.mha", np.transpose(data))
    out[".nrrd"] = sitk_file(folder / "good.nrrd", np.transpose(data))
    out[".dcm"] = folder / "good.dcm"  # a real slice (GDCM does not write synthetic 3D files)
    shutil.copyfile(sorted((TCIA / "T1post").glob("*.dcm"))[0], out[".dcm"])
    return out


def truncated(source: Path, target: Path, fraction: float) -> Path:
    blob = source.read_bytes()
    target.write_bytes(blob[: max(1, int(len(blob) * fraction))])
    return target


def bit_flipped(source: Path, target: Path, rng: random.Random, flips: int = 1) -> Path:
    blob = bytearray(source.read_bytes())
    for _ in range(flips):
        i = rng.randrange(len(blob))
        blob[i] ^= 1 << rng.randrange(8)
    target.write_bytes(bytes(blob))
    return target


def with_memory_limit() -> dict[str, str]:
    """The environment the fuzz tests read files under (a machine with :data:`FUZZ_MEMORY_BYTES`)."""
    return {"MEDSEG_AVAILABLE_MEMORY": str(FUZZ_MEMORY_BYTES)}
