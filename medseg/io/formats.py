"""The one registry of input formats: which files are images, how each is read, what a case is.

Discovery (``medseg predict --input``), ``medseg manifest build`` and ``verify``/training all ask
this registry, so a format added here is found, listed and read the same way everywhere. Built in:

==========  ===========================  ============================================
format      suffixes                     reader
==========  ===========================  ============================================
nifti       .nii .nii.gz                 MONAI ``NibabelReader``
dicom       .dcm .dicom .ima, or none    :class:`~medseg.io.sitk_reader.SimpleITKReader`
            (``DICM`` magic); a folder   (a folder is one series, sorted by position)
metaimage   .mha .mhd                    SimpleITKReader
nrrd        .nrrd .nhdr                  SimpleITKReader
image2d     .png .jpg .jpeg .tif .tiff   :class:`~medseg.io.image2d_reader.Image2DReader`
            (one 2D image per file)      (Pillow; tifffile for TIFFs Pillow cannot read)

dicom-seg   (refines dicom: a DICOM      :class:`~medseg.io.dicom_seg.DicomSegReader`: an integer
            file whose SOP class is      label map of segment numbers (needs ``highdicom``)
            Segmentation Storage)
==========  ===========================  ============================================

A format may *refine* another: a file that would be the other's (by suffix or content) is the
refining format's when its ``sniff`` says so. That is how a DICOM SEG, named ``.dcm`` like any
DICOM file, is read by its own reader.

Another package adds a format through the ``medseg.readers`` entry-point group; the entry
point names a :class:`VolumeFormat` (or a function returning one)::

    [project.entry-points."medseg.readers"]
    npy = my_package.formats:NPY_FORMAT

The reader is any MONAI ``ImageReader`` whose ``get_data`` returns a channel-last array and a
metadata dict with a RAS ``affine`` (MONAI's convention), so orientation and spacing survive.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import numpy as np
from monai.config import PathLike
from monai.data import ImageReader, NibabelReader
from monai.utils import ensure_tuple

from medseg.errors import VolumeReadError
from medseg.io.dicom_seg import DicomSegReader
from medseg.io.dicom_sniff import is_dicom_file, is_dicom_seg
from medseg.io.image2d_reader import IMAGE2D_SUFFIXES, Image2DReader
from medseg.io.preflight import check_file
from medseg.io.sitk_reader import SimpleITKReader

#: Entry-point group through which other packages add input formats.
ENTRY_POINT_GROUP = "medseg.readers"
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VolumeFormat:
    """One input format: how to recognise its files, how to read them, and what a case is.

    Attributes:
        name: short name shown in messages and ``medseg describe`` ("nifti", "dicom", ...).
        suffixes: lower-case file-name endings, with the dot (".nii.gz").
        make_reader: builds the MONAI ``ImageReader`` that reads these files.
        series: True when the files of one folder and series make one case (DICOM); a folder
            given as input is then read as one series.
        sniff: recognises a file of this format whose name has none of the suffixes (DICOM
            files are often named ``IM0001`` or have no suffix at all).
        refines: another format's name: a file of that format is this one's when ``sniff`` says
            so (DICOM SEG refines DICOM); such a format has no suffixes of its own.
        described: how messages name its files when it has no suffixes.
        labels_only: its files are label maps, never scans: discovery leaves them out of a
            folder of inputs (a DICOM SEG beside its series).
    """

    name: str
    suffixes: tuple[str, ...]
    make_reader: Callable[[], ImageReader]
    series: bool = False
    sniff: Callable[[Path], bool] | None = None
    refines: str | None = None
    described: str = ""
    labels_only: bool = False


BUILTIN_FORMATS = (
    VolumeFormat("nifti", (".nii", ".nii.gz"), NibabelReader),
    VolumeFormat("dicom", (".dcm", ".dicom", ".ima"), SimpleITKReader, series=True, sniff=is_dicom_file),
    VolumeFormat("metaimage", (".mha", ".mhd"), SimpleITKReader),
    VolumeFormat("nrrd", (".nrrd", ".nhdr"), SimpleITKReader),
    VolumeFormat("image2d", IMAGE2D_SUFFIXES, Image2DReader),
    VolumeFormat("dicom-seg", (), DicomSegReader, sniff=is_dicom_seg, refines="dicom",
                 described="a DICOM file of SOP class Segmentation Storage", labels_only=True),
)


class FormatRegistry:
    """Input formats by name, with lookup by path. Entry-point formats load on first use."""

    def __init__(self, builtin: Sequence[VolumeFormat]) -> None:
        self._formats: dict[str, VolumeFormat] = {}
        self._plugins_loaded = False
        for fmt in builtin:
            self.register(fmt)

    # ---------------------------------------------------------------------------- registering

    def register(self, fmt: VolumeFormat) -> None:
        """Add a format.

        Raises:
            ValueError: its name or one of its suffixes is already another format's.
        """
        if fmt.name in self._formats:
            raise ValueError(f"input format {fmt.name!r} is already registered; choose another name")
        bad = [s for s in fmt.suffixes if not s.startswith(".") or s != s.lower()]
        if bad:
            raise ValueError(f"input format {fmt.name!r}: suffixes must be lower case and start with a dot, got {bad}")
        for other in self._formats.values():
            shared = set(fmt.suffixes) & set(other.suffixes)
            if shared:
                raise ValueError(f"input format {fmt.name!r}: suffix(es) {sorted(shared)} already belong to "
                                 f"format {other.name!r}")
        self._formats[fmt.name] = fmt

    def unregister(self, name: str) -> None:
        self._formats.pop(name, None)

    @contextmanager
    def registered(self, fmt: VolumeFormat) -> Iterator[VolumeFormat]:
        """Register ``fmt`` for the duration of a ``with`` block (tests, notebooks)."""
        self.register(fmt)
        try:
            yield fmt
        finally:
            self.unregister(fmt.name)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._formats:
                continue
            try:
                value = ep.load()
                fmt = value() if callable(value) and not isinstance(value, VolumeFormat) else value
                if not isinstance(fmt, VolumeFormat):
                    raise TypeError(f"expected a medseg.io.formats.VolumeFormat, got {type(fmt).__name__}")
                self.register(fmt)
            except Exception as err:  # a broken plugin must not take the built-in formats down with it
                log.warning("input format %r from %s (entry point %s) was not loaded: %s",
                            ep.name, ep.value, ENTRY_POINT_GROUP, err)

    # ------------------------------------------------------------------------------- looking up

    def formats(self) -> list[VolumeFormat]:
        self._load_plugins()
        return list(self._formats.values())

    def suffixes(self) -> tuple[str, ...]:
        """Every known suffix, longest first (so ".nii.gz" matches before ".gz" would)."""
        return tuple(sorted((s for f in self.formats() for s in f.suffixes), key=len, reverse=True))

    def by_suffix(self, name: str) -> VolumeFormat | None:
        """The format whose suffix ``name`` ends with (case-insensitive), else None. Reads nothing."""
        lower = name.lower()
        matches = [(len(s), f) for f in self.formats() for s in f.suffixes if lower.endswith(s)]
        return max(matches, key=lambda m: m[0])[1] if matches else None

    def for_path(self, path: Path) -> VolumeFormat | None:
        """The format of a file (by suffix, then by content) or of a series folder; None if unknown."""
        path = Path(path)
        if path.is_dir():
            return next((f for f in self.formats() if f.series), None)
        found = self.by_suffix(path.name)
        if found is None and path.is_file():
            found = next((f for f in self.formats() if f.sniff is not None and f.refines is None and f.sniff(path)),
                         None)
        if found is None or not path.is_file():
            return found
        return next((f for f in self.formats() if f.refines == found.name and f.sniff is not None and f.sniff(path)),
                    found)

    def strip_suffix(self, name: str) -> str:
        """``case.nii.gz`` -> ``case``: the name without its (longest) known suffix."""
        lower = name.lower()
        for suffix in self.suffixes():
            if lower.endswith(suffix):
                return name[: -len(suffix)]
        return name

    def describe(self) -> str:
        """One line per format, for messages: ``nifti (.nii, .nii.gz)``."""
        return ", ".join(f"{f.name} ({' '.join(f.suffixes) or f.described}{', or a folder' if f.series else ''})"
                         for f in self.formats())

    def reader_for(self, paths: Sequence[Path]) -> tuple[VolumeFormat, ImageReader]:
        """The format and a fresh reader for ``paths`` (one file, a series folder, or channel files).

        Raises:
            VolumeReadError: a path has no known format, or the channel files mix formats.
        """
        found = []
        for path in paths:
            fmt = self.for_path(path)
            if fmt is None:
                raise VolumeReadError(
                    f"{path}: not a format medseg reads (its name ends in {''.join(Path(path).suffixes) or 'no suffix'}). "
                    f"Expected one of: {self.describe()}. Convert the file, or add a reader through the "
                    f"{ENTRY_POINT_GROUP!r} entry-point group.")
            found.append(fmt)
        if len({f.name for f in found}) > 1:
            listing = ", ".join(f"{p} ({f.name})" for p, f in zip(paths, found))
            raise VolumeReadError(f"channel files of one case are in different formats: {listing}. "
                                  "Convert them to one format (NIfTI is the simplest).")
        return found[0], found[0].make_reader()


#: The registry every reader, discovery and manifest builder uses.
FORMATS = FormatRegistry(BUILTIN_FORMATS)


def strip_volume_suffix(name: str) -> str:
    """``case.nii.gz`` -> ``case``: the name without its (longest) known image suffix."""
    return FORMATS.strip_suffix(name)


@dataclass(frozen=True)
class _ReadBy:
    """What :class:`RegistryReader.read` returns: the object, and the reader that must unpack it."""

    reader: ImageReader
    image: Any
    paths: tuple[Path, ...] = ()


class RegistryReader(ImageReader):
    """A MONAI ``ImageReader`` that hands each file to the reader :data:`FORMATS` names for it.

    Registered on MONAI's ``LoadImage(d)``, it claims every file, so MONAI's default readers
    never pick up a format medseg does not list (an unknown file gets a message listing the
    formats, not whatever PIL or NumPy make of it).
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return True

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs: Any) -> _ReadBy:
        paths = [Path(p) for p in ensure_tuple(data)]
        fmt, reader = FORMATS.reader_for(paths)
        for path in paths:  # size and header first: refuse hostile files before allocating for them
            check_file(path, fmt.name)
        names = [str(p) for p in paths]
        return _ReadBy(reader, reader.read(names if len(names) > 1 else names[0], **kwargs), tuple(paths))

    def get_data(self, img: _ReadBy) -> tuple[Any, dict]:
        array, meta = img.reader.get_data(img.image)
        # The header was checked before reading, but readers derive the affine themselves (MONAI's
        # NIfTI reader rebuilds it from pixdim when the two disagree): check what came out.
        affine = meta.get("affine")
        if affine is not None and not np.all(np.isfinite(np.asarray(affine, dtype=np.float64))):
            names = ", ".join(str(p) for p in img.paths) or "the image"
            raise VolumeReadError(
                f"{names}: its voxel-to-world affine comes out non-finite ({np.round(np.asarray(affine, dtype=np.float64), 4).tolist()}): "
                "the header's voxel sizes or orientation hold NaN/Inf. Fix the header (pixdim, sform/qform) or export the "
                "file again.")
        return array, meta
