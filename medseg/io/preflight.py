"""Checks on a file before a reader allocates anything for it, and on an image's values after.

Readers fail late and vaguely on hostile files: a NIfTI header that claims 2000³ float32 over a
few kilobytes makes nibabel try to allocate 30 GiB, a zero-byte file becomes "applying transform
<LoadImaged object at 0x...>". Reading the header first (a few hundred bytes) lets medseg say
what the file claims, what it holds, and what to do, and refuse before memory runs out.

:func:`check_file` runs inside :class:`~medseg.io.formats.RegistryReader`, so every load in
training, ``verify`` and ``predict`` goes through it; :class:`CheckImageValuesd` sits right
after the loader in every preprocessing chain and refuses NaN/Inf and constant images.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform

from medseg.errors import ImageValueError, VolumeReadError, cause_text

#: A gzip stream cannot expand more than about 1032:1 (deflate's limit), so a compressed file
#: whose header claims more than this many times its size is corrupt, whatever its trailer says.
MAX_DEFLATE_RATIO = 1032
#: Memory an image may need, as a share of what the machine has available: readers copy the
#: data at least once (file -> array -> float32 tensor), and preprocessing makes more copies.
MEMORY_SHARE = 0.5


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - the loop returns


def available_memory() -> int:
    """Bytes of memory this machine can give a new allocation (``MemAvailable``; total if unknown)."""
    override = os.environ.get("MEDSEG_AVAILABLE_MEMORY")  # lets tests and containers state the limit
    if override:
        return int(float(override))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


# ----------------------------------------------------------------------------------- before reading


def check_file(path: Path, format_name: str) -> None:
    """Refuse a file whose size or header shows it cannot be a usable image, before reading its data.

    Args:
        path: the file (a DICOM series folder is checked file by file by its reader).
        format_name: its format in :data:`medseg.io.formats.FORMATS` ("nifti", "metaimage", ...).

    Raises:
        VolumeReadError: empty file, truncated data, a header whose shape, data type, voxel size or
            affine is impossible, or an image that would need more memory than the machine has.
    """
    path = Path(path)
    if path.is_dir():
        return
    try:
        size = path.stat().st_size
    except OSError as err:
        raise VolumeReadError(f"{path}: cannot be opened ({err.strerror or err}). Check the path and its permissions.") from None
    if size == 0:
        raise VolumeReadError(f"{path}: the file is empty (0 bytes). Expected: a {_shown(format_name)} image. "
                              "Copy or export it again; an interrupted download or copy leaves empty files.")
    if format_name == "nifti":
        _check_nifti(path, size)
    elif format_name == "dicom-seg":
        _check_dicom_seg(path)
    elif format_name in ("metaimage", "nrrd", "dicom"):
        _check_sitk_header(path, size, format_name)
    elif format_name == "image2d":
        _check_image2d(path)


def _shown(format_name: str) -> str:
    return {"nifti": "NIfTI", "dicom": "DICOM", "metaimage": "MetaImage", "nrrd": "NRRD",
            "image2d": "PNG/JPEG/TIFF", "dicom-seg": "DICOM SEG"}.get(format_name, format_name)


def _check_image2d(path: Path) -> None:
    """Header of a PNG/JPEG/TIFF (Pillow reads it lazily): one page, a possible size, memory."""
    from medseg.io.image2d_reader import read_header

    header = read_header(path)  # refuses unreadable files and multi-page TIFFs
    shape = (*header.size, *((header.channels,) if header.channels > 1 else ()))
    check_header(path, shape, header.itemsize, np.eye(3), "2D image", spatial=2)


def _check_dicom_seg(path: Path) -> None:
    """A DICOM SEG's frames (GDCM cannot read every SEG header): Rows x Columns x NumberOfFrames."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Rows", "Columns", "NumberOfFrames"])
        shape = (int(ds.Columns), int(ds.Rows), int(ds.get("NumberOfFrames") or 1))
    except Exception as err:  # noqa: BLE001 - pydicom raises many types on a damaged header
        raise VolumeReadError(f"{path}: not a readable DICOM SEG: its header cannot be parsed ({cause_text(err)}). "
                              "It is truncated or corrupt; export it again.") from None
    check_header(path, shape, 1, None, "DICOM SEG")


def _check_nifti(path: Path, size: int) -> None:
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    compressed = path.name.lower().endswith(".gz")
    with open(path, "rb") as fh:
        start = fh.read(4)
    if compressed and start[:2] != b"\x1f\x8b":
        raise VolumeReadError(f"{path}: not a NIfTI image. Its name ends in .gz but it is not gzip-compressed "
                              f"(it starts with {start!r}). If it is an uncompressed NIfTI, rename it to .nii; "
                              "otherwise it is another kind of file in the image folder: move it out.")
    try:
        header = _raw_nifti_header(path, compressed)
    except (ImageFileError, HeaderDataError, EOFError, OSError, ValueError, zlib.error) as err:
        raise VolumeReadError(f"{path}: could not be read as NIfTI: no valid header ({cause_text(err)}). Expected: a "
                              f"NIfTI-1/2 file{' (gzip-compressed)' if compressed else ''}. It is truncated, corrupt "
                              "or another kind of file under a NIfTI name; export it again.") from None
    shape = tuple(int(s) for s in header.get_data_shape())
    try:
        dtype = np.dtype(header.get_data_dtype())
    except TypeError as err:
        raise VolumeReadError(f"{path}: the header names a data type medseg cannot read ({err}). "
                              "Expected: an integer or floating-point image; convert it.") from None
    _check_nifti_pixdim(path, header, len(shape))
    check_header(path, shape, dtype.itemsize, _nifti_affine(header), "NIfTI")
    offset = max(int(header.get_data_offset()), int(header.single_vox_offset)) if header.single_magic in bytes(
        header["magic"]) else int(header.get_data_offset())
    claimed = offset + math.prod(shape) * dtype.itemsize
    if compressed:
        holds = _gzip_size(path)
        if claimed > size * MAX_DEFLATE_RATIO or (holds is not None and claimed < 2**32 and holds < claimed):
            found = f"the file decompresses to {human_bytes(holds)}" if holds is not None else f"the file holds {human_bytes(size)}"
            raise VolumeReadError(
                f"{path}: truncated or corrupt. The header says {_describe(shape, dtype)} = "
                f"{human_bytes(claimed - offset)} of image data, but {found}. Export or copy the file again.")
    elif size < claimed:
        raise VolumeReadError(
            f"{path}: truncated or corrupt. The header says {_describe(shape, dtype)} = {human_bytes(claimed - offset)} "
            f"of image data after a {offset}-byte header, but the file holds {human_bytes(size)}. "
            "Export or copy the file again.")


def _raw_nifti_header(path: Path, compressed: bool) -> Any:
    """The header as stored: ``nib.load`` would already have "fixed" zero voxel sizes to 1 mm."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.nifti1 import Nifti1Header
    from nibabel.nifti2 import Nifti2Header

    opener = gzip.open if compressed else open
    with opener(path, "rb") as fh:
        block = fh.read(540)
    for klass in (Nifti1Header, Nifti2Header):
        if len(block) < klass.sizeof_hdr:
            continue
        for order in ("<", ">"):
            if int(np.frombuffer(block[:4], dtype=f"{order}i4")[0]) == klass.sizeof_hdr:
                return klass(block[: klass.sizeof_hdr], check=False)
    raise ImageFileError(f"no NIfTI-1 or NIfTI-2 header in its first {len(block)} bytes (sizeof_hdr is neither 348 nor 540)")


def _check_nifti_pixdim(path: Path, header: Any, ndim: int) -> None:
    """nibabel silently turns a zero voxel size into 1 mm when the affine comes from ``pixdim``
    (no sform); volumes in mL would then be made up. Negative ones it takes as their absolute
    value, as ITK does, which keeps their meaning."""
    spatial = np.asarray(header["pixdim"][1:4], dtype=np.float64)
    if not np.all(np.isfinite(spatial)):  # MONAI rebuilds the affine from these when they disagree with the sform
        raise VolumeReadError(
            f"{path}: the NIfTI header gives voxel sizes (pixdim) {spatial.tolist()}, which are not finite. Expected "
            "positive, finite voxel sizes in mm; fix pixdim or export the file again.")
    if int(header["sform_code"]) > 0:
        return
    zooms = np.asarray(header["pixdim"][1 : 1 + min(ndim, 3)], dtype=np.float64)
    if np.any(zooms == 0) or not np.all(np.isfinite(zooms)):
        raise VolumeReadError(
            f"{path}: the NIfTI header gives voxel sizes (pixdim) {zooms.tolist()} and no sform, so the voxels "
            "have no size in space. Expected positive, finite voxel sizes in mm; fix pixdim (or set an sform) "
            "or export the file again.")


def _nifti_affine(header: Any) -> np.ndarray | None:
    try:
        return np.asarray(header.get_best_affine(), dtype=np.float64)
    except Exception:  # noqa: BLE001 - nibabel raises several types for broken qform/sform fields
        return None


def _gzip_size(path: Path) -> int | None:
    """The uncompressed size from a gzip file's trailer (modulo 2**32), or None if it has none."""
    try:
        with open(path, "rb") as fh:
            if fh.read(2) != b"\x1f\x8b":
                return None
            fh.seek(-4, os.SEEK_END)
            return int.from_bytes(fh.read(4), "little")
    except OSError:
        return None


def _check_sitk_header(path: Path, size: int, format_name: str) -> None:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise VolumeReadError(f"{path}: not a readable {_shown(format_name)} file: its header cannot be parsed "
                              f"({cause_text(err)}). It is truncated, corrupt or another kind of file under this "
                              "name; export it again.") from None
    shape = tuple(int(s) for s in reader.GetSize())
    components = int(reader.GetNumberOfComponents())
    itemsize = _sitk_itemsize(reader.GetPixelID())
    dim = len(shape)
    spacing = np.asarray(reader.GetSpacing(), dtype=np.float64)
    direction = np.asarray(reader.GetDirection(), dtype=np.float64).reshape(dim, dim)
    affine = np.eye(dim + 1)
    affine[:dim, :dim] = direction @ np.diag(spacing)
    affine[:dim, dim] = reader.GetOrigin()
    check_header(path, shape + ((components,) if components > 1 else ()), itemsize, affine, format_name,
                 spatial=dim)
    if format_name == "metaimage" and path.suffix.lower() == ".mha":
        _check_inline_data(path, size, shape, components * itemsize)


def _sitk_itemsize(pixel_id: int) -> int:
    import SimpleITK as sitk

    sizes = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2, sitk.sitkUInt32: 4,
             sitk.sitkInt32: 4, sitk.sitkUInt64: 8, sitk.sitkInt64: 8, sitk.sitkFloat32: 4, sitk.sitkFloat64: 8}
    vector = {sitk.sitkVectorUInt8: 1, sitk.sitkVectorInt8: 1, sitk.sitkVectorUInt16: 2, sitk.sitkVectorInt16: 2,
              sitk.sitkVectorUInt32: 4, sitk.sitkVectorInt32: 4, sitk.sitkVectorFloat32: 4, sitk.sitkVectorFloat64: 8,
              sitk.sitkComplexFloat32: 8, sitk.sitkComplexFloat64: 16}
    return sizes.get(pixel_id) or vector.get(pixel_id) or 8


def _check_inline_data(path: Path, size: int, shape: Sequence[int], bytes_per_voxel: int) -> None:
    """A ``.mha`` with uncompressed data after its header must hold all of it."""
    with open(path, "rb") as fh:
        head = fh.read(16384)
    end = head.find(b"ElementDataFile")
    if end < 0:
        return
    line_end = head.find(b"\n", end)
    fields = dict(re.findall(r"(\w+)\s*=\s*([^\r\n]*)", head[: line_end].decode("latin-1")))
    if fields.get("ElementDataFile", "").strip() != "LOCAL" or fields.get("CompressedData", "False").strip() == "True":
        return
    claimed = math.prod(shape) * bytes_per_voxel
    holds = size - (line_end + 1)
    if holds < claimed:
        raise VolumeReadError(f"{path}: truncated or corrupt. The header says {'×'.join(map(str, shape))} voxels = "
                              f"{human_bytes(claimed)} of image data, but the file holds {human_bytes(holds)} after "
                              "its header. Export or copy the file again.")


def check_header(path: Path, shape: Sequence[int], itemsize: int, affine: np.ndarray | None, kind: str,
                 spatial: int | None = None) -> None:
    """Refuse a header whose shape, voxel size or affine is impossible, or that needs too much memory.

    Args:
        path: the file, for messages.
        shape: the data shape the header claims (spatial axes first, then channels/time).
        itemsize: bytes per stored value.
        affine: voxel -> world affine (None if the header has none that can be computed).
        kind: the format, for messages.
        spatial: how many of ``shape``'s axes are spatial (default: up to 3).

    Raises:
        VolumeReadError: with what the header says, why it is impossible, and the fix.
    """
    if not shape or any(s <= 0 for s in shape):
        raise VolumeReadError(f"{path}: the {kind} header gives the image shape {tuple(shape)}; every axis needs at "
                              "least one voxel. The header is corrupt: export the file again.")
    if len(shape) > 4 and any(s > 1 for s in shape[4:]):
        raise VolumeReadError(f"{path}: a {len(shape)}D image (shape {tuple(shape)}). medseg reads 2D and 3D images, "
                              "with channels as a 4th axis; split the extra axes (time points, vector components) "
                              "into one file per channel.")
    needed = math.prod(shape) * max(itemsize, 4)  # becomes float32 (at least) once loaded
    available = available_memory()
    if needed > available * MEMORY_SHARE:
        raise VolumeReadError(
            f"{path}: the {kind} header says shape {tuple(shape)}, which needs {human_bytes(needed)} in memory once "
            f"loaded; this machine has {human_bytes(available)} available. If the file really is that large, crop or "
            "downsample it first (or predict on a machine with more memory); otherwise the header is corrupt.")
    if affine is None:
        return
    dims = min(spatial if spatial is not None else 3, affine.shape[0] - 1, len(shape))
    linear = affine[:dims, :dims]
    if not np.all(np.isfinite(affine)):
        raise VolumeReadError(f"{path}: the {kind} header's voxel-to-world affine holds NaN or Inf "
                              f"({np.round(affine, 4).tolist()}). Expected finite voxel sizes, directions and origin; "
                              "fix the header (e.g. nibabel's set_sform / set_qform) or export the file again.")
    voxel_sizes = np.linalg.norm(linear, axis=0)
    if np.any(voxel_sizes <= 0) or abs(float(np.linalg.det(linear))) < 1e-12 * max(float(np.prod(voxel_sizes)), 1e-300):
        raise VolumeReadError(
            f"{path}: the {kind} header gives voxel sizes {np.round(voxel_sizes, 6).tolist()} and a singular "
            f"direction matrix (affine {np.round(affine, 4).tolist()}): no position in space can be computed for "
            "its voxels. Expected positive voxel sizes along independent axes; fix the header's spacing / "
            "orientation or export the file again.")


def _describe(shape: Sequence[int], dtype: np.dtype) -> str:
    return f"{'×'.join(str(s) for s in shape)} {dtype.name}"


# ----------------------------------------------------------------------------------- after reading


def _all_finite(data: torch.Tensor, part_voxels: int = 1 << 22) -> bool:
    """No NaN or Inf, checked a part at a time: ``torch.isfinite`` of a float volume makes its absolute
    value and three boolean volumes (about 2.3 times a float32 volume) before reducing them."""
    flat = (data.as_tensor() if hasattr(data, "as_tensor") else data).reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(part_voxels))


def check_values(image: torch.Tensor | np.ndarray, source: str, allow_constant: bool = False) -> None:
    """Refuse an image with NaN/Inf voxels, or one value everywhere (unless ``allow_constant``).

    A scanner export with NaN voxels, or a blank one, would otherwise yield a confident-looking
    empty mask with status "ok".

    Raises:
        ImageValueError: names the image, how many voxels are bad or the single value, and the fix.
    """
    data = torch.as_tensor(image)
    if data.numel() == 0:
        raise ImageValueError(f"{source}: the image holds no voxels (shape {tuple(data.shape)}); export it again.")
    if (data.is_floating_point() or data.is_complex()) and not _all_finite(data):
        nan = int(torch.isnan(data).sum())
        inf = int(data.numel() - int(torch.isfinite(data).sum()) - nan)
        raise ImageValueError(
            f"{source}: {nan + inf} of {data.numel()} voxels are not finite ({nan} NaN, {inf} Inf). Expected "
            "finite intensities. Fix the export (NaN often marks voxels outside the scanned field of view: "
            "replace them with the background value), or leave the scan out.")
    low, high = data.min(), data.max()
    if not allow_constant and bool(low == high):
        raise ImageValueError(
            f"{source}: every voxel has the value {float(low):g}, so there is nothing to see. Check that this is "
            "the intended scan (not a blank export or an empty mask given as an image); if constant images are "
            "expected, allow them with preprocess.allow_constant: true (or predict --allow-constant).")


class CheckImageValuesd(MapTransform):
    """:func:`check_values` as a MONAI transform, right after loading (raw intensities)."""

    def __init__(self, keys: KeysCollection, allow_constant: bool = False) -> None:
        super().__init__(keys)
        self.allow_constant = allow_constant

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            value = d[key]
            meta = getattr(value, "meta", {}) or {}
            source = str(meta.get("filename_or_obj") or "image given in memory")
            check_values(value, source, self.allow_constant)
        return d
