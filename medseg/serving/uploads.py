"""A client's upload turned into one scan on disk, inside the request's private folder, or refused.

Nothing the client says is used as a path: the format is recognised from the bytes themselves
(magic numbers) and the scan is written as ``scan`` plus that format's suffix; a zipped DICOM
series is unpacked to numbered files. Every size is bounded before it is paid for: the body while
it streams in, a gzip or zip by what it unpacks to (counted while unpacking, never trusted from a
header), a scan by the voxels its header claims. A header that points at another file (an NRRD
``data file:``, an MHA ``ElementDataFile`` other than ``LOCAL``) is refused: it would read a
server file the client chose.
"""

from __future__ import annotations

import mmap
import re
import shutil
import stat
import zipfile
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from medseg.serving.guard import MIB, ServeLimits
from medseg.serving.problems import Problem

CHUNK = 1 << 20
#: Raw-body content types taken as a scan (multipart/form-data is parsed for its ``file`` part).
SCAN_CONTENT_TYPES = frozenset({
    "application/octet-stream", "application/gzip", "application/x-gzip", "application/zip",
    "application/x-zip-compressed", "application/dicom", "image/png", "application/x-nifti", "image/nifti",
    "application/x-nrrd", "application/x-metaimage"})
FORMATS_TEXT = ("a NIfTI (.nii, .nii.gz), NRRD (.nrrd, data inline), MetaImage (.mha, data inline), PNG, DICOM "
                "file, or a zip of one DICOM series, as the body (application/octet-stream) or the 'file' part of "
                "multipart/form-data")


class ScanKind(StrEnum):
    """What an upload holds, recognised from its bytes; the value is the suffix it is saved with."""

    NIFTI_GZ = ".nii.gz"
    NIFTI = ".nii"
    NRRD = ".nrrd"
    METAIMAGE = ".mha"
    PNG = ".png"
    DICOM = ".dcm"
    DICOM_ZIP = ".zip"


@dataclass(frozen=True)
class Scan:
    """An accepted upload: what it is and where it lies (a file, or a series folder for a zip)."""

    kind: ScanKind
    path: Path
    voxels: int


def too_large(what: str, limit_bytes: int, found: str, fix: str) -> Problem:
    return Problem(413, f"the {what} is larger than this server takes", f"at most {limit_bytes / MIB:.0f} MiB",
                   found, fix)


async def receive(chunks: AsyncIterator[bytes], declared: int | None, dest: Path, limits: ServeLimits) -> int:
    """Write the request body to ``dest``, counting: refused (413) as soon as it passes the limit.

    Raises:
        Problem: 413 when ``Content-Length`` or the bytes received pass ``limits.max_body_bytes``;
            400 when fewer bytes arrive than ``Content-Length`` said.
    """
    limit = limits.max_body_bytes
    fix = "send a smaller scan (crop it, or compress it as .nii.gz), or ask the operator to raise --max-body-mb"
    if declared is not None and declared > limit:
        raise too_large("request body", limit, f"Content-Length {declared} bytes", fix)
    received = 0
    with open(dest, "wb") as fh:
        async for chunk in chunks:
            received += len(chunk)
            if received > limit:
                raise too_large("request body", limit, f"more than {received} bytes", fix)
            fh.write(chunk)
    if declared is not None and received < declared:
        raise Problem(400, "the request body is shorter than its Content-Length", f"{declared} bytes",
                      f"{received} bytes", "send the whole file")
    if received == 0:
        raise Problem(400, "the request has no scan", FORMATS_TEXT, "an empty body", "send the file's bytes")
    return received


def content_type(header: str) -> tuple[str, dict[str, str]]:
    """``multipart/form-data; boundary=x`` -> ``("multipart/form-data", {"boundary": "x"})``."""
    main, *rest = header.split(";")
    params = {}
    for item in rest:
        key, _, value = item.strip().partition("=")
        params[key.strip().lower()] = value.strip().strip('"')
    return main.strip().lower(), params


def check_content_type(header: str | None) -> tuple[str, dict[str, str]]:
    """The body's media type, refused (415) unless it can hold a scan."""
    kind, params = content_type(header or "application/octet-stream")
    if kind == "multipart/form-data":
        if not params.get("boundary") or len(params["boundary"]) > 200:
            raise Problem(400, "multipart/form-data without a usable boundary", "a boundary parameter (1-200 chars)",
                          header or "", "let your HTTP client build the multipart body (e.g. curl -F file=@scan.nii.gz)")
        return kind, params
    if kind not in SCAN_CONTENT_TYPES:
        raise Problem(415, f"a body of type {kind!r} cannot hold a scan", FORMATS_TEXT, f"Content-Type: {header}",
                      "send the file as application/octet-stream, or as multipart/form-data with a 'file' part")
    return kind, params


def extract_part(body: Path, boundary: str, dest: Path) -> None:
    """Copy the ``file`` part of a multipart body to ``dest`` (the part's file name is ignored).

    Raises:
        Problem: 400 when the body is not well-formed multipart or has no ``file`` part.
    """
    delimiter = b"--" + boundary.encode("latin-1")
    with open(body, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = data.find(delimiter)
        while position >= 0:
            start = position + len(delimiter)
            if data[start:start + 2] == b"--":
                break
            head_end = data.find(b"\r\n\r\n", start, start + 16384)
            end = data.find(b"\r\n" + delimiter, head_end + 4) if head_end >= 0 else -1
            if head_end < 0 or end < 0:
                raise Problem(400, "the multipart body is cut short or malformed", "parts closed by the boundary",
                              "a part without its end", "send the whole request; let your client build the body")
            headers = data[start:head_end].decode("latin-1").lower()
            if re.search(r'content-disposition:[^\r\n]*\bname="?file"?(;|\s|\r|$)', headers):
                with open(dest, "wb") as out:
                    for offset in range(head_end + 4, end, CHUNK):
                        out.write(data[offset:min(offset + CHUNK, end)])
                return
            position = end + 2
    raise Problem(400, "the multipart body has no 'file' part", "a part named 'file' holding the scan",
                  "no such part", "e.g. curl -F file=@scan.nii.gz http://HOST/predict")


def sniff(path: Path) -> ScanKind | None:
    """The kind of scan ``path`` holds, from its first bytes (never from a name)."""
    with open(path, "rb") as fh:
        head = fh.read(352)
    if head[:2] == b"\x1f\x8b":
        return ScanKind.NIFTI_GZ
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return ScanKind.PNG
    if head[:4] == b"PK\x03\x04":
        return ScanKind.DICOM_ZIP
    if head[:4] == b"NRRD":
        return ScanKind.NRRD
    if head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00":
        return ScanKind.NIFTI
    if head[128:132] == b"DICM":
        return ScanKind.DICOM
    if re.match(rb"\s*(ObjectType|NDims)\s*=", head):
        return ScanKind.METAIMAGE
    return None


def gunzip_checked(source: Path, dest: Path, limit: int) -> None:
    """Decompress ``source`` to ``dest``, refusing (413) once it passes ``limit`` bytes (a gzip bomb)."""
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
    written = 0
    with open(source, "rb") as fh, open(dest, "wb") as out:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            piece = inflater.decompress(chunk, CHUNK)
            while True:
                written += len(piece)
                if written > limit:
                    raise too_large("decompressed upload", limit, f"more than {written} bytes unpacked from "
                                    f"{source.stat().st_size} compressed", "send a smaller scan, or ask the operator "
                                    "to raise --max-decompressed-mb")
                out.write(piece)
                if not inflater.unconsumed_tail:
                    break
                piece = inflater.decompress(inflater.unconsumed_tail, CHUNK)
            if inflater.eof:
                break
    if not inflater.eof:
        raise Problem(400, "the gzip stream is cut short", "a whole .nii.gz file", f"{written} bytes before it ended",
                      "send the whole file")


def check_gzip(path: Path, scratch: Path, limits: ServeLimits) -> None:
    """A .nii.gz upload must unpack, within the limit, to a NIfTI (the unpacked copy is removed)."""
    try:
        gunzip_checked(path, scratch, limits.max_decompressed_bytes)
        with open(scratch, "rb") as fh:
            head = fh.read(352)
    except zlib.error as err:
        raise Problem(400, "the gzip data are damaged", "a .nii.gz file", f"zlib: {err}", "send the file again") from None
    finally:
        scratch.unlink(missing_ok=True)
    if not (head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] == b"n+2\x00"):
        raise Problem(415, "the gzip upload does not hold a NIfTI", FORMATS_TEXT, "gzip data without a NIfTI header",
                      "send a .nii.gz, or the other formats uncompressed")


def unzip_series(path: Path, folder: Path, limits: ServeLimits) -> None:
    """Unpack a zipped DICOM series into ``folder`` as ``0000.dcm``, ``0001.dcm``... (members' names unused).

    Raises:
        Problem: 400 for a damaged zip, a member that is a link, absolute or climbs with ``..``
            (zip slip); 413 for too many members or more unpacked bytes than the limit.
    """
    limit = limits.max_decompressed_bytes
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        raise Problem(400, "the zip is damaged", "a zip of one DICOM series", f"{err}", "zip the series again") from None
    with archive:
        members = [m for m in archive.infolist() if not m.is_dir()]
        if len(archive.infolist()) > limits.max_zip_members:
            raise Problem(413, "the zip has too many members", f"at most {limits.max_zip_members} files",
                          f"{len(archive.infolist())} entries", "send one series per request")
        for member in archive.infolist():
            name = member.filename.replace("\\", "/")
            mode = member.external_attr >> 16
            if name.startswith("/") or re.match(r"^[A-Za-z]:", name) or ".." in name.split("/") or stat.S_ISLNK(mode):
                raise Problem(400, "the zip has a member that points outside it", "plain files with relative names",
                              f"member {member.filename[:200]!r}", "zip the series' files themselves (zip -j)")
        if not members:
            raise Problem(400, "the zip is empty", "a zip of one DICOM series", "no files", "zip the series' files")
        if sum(m.file_size for m in members) > limit:
            raise too_large("unpacked zip", limit, f"{sum(m.file_size for m in members)} bytes declared",
                            "send a smaller series, or ask the operator to raise --max-decompressed-mb")
        folder.mkdir()
        written = 0
        try:
            for index, member in enumerate(members):
                with archive.open(member) as source, open(folder / f"{index:04d}.dcm", "wb") as out:
                    while chunk := source.read(CHUNK):
                        written += len(chunk)
                        if written > limit:  # declared sizes can lie
                            raise too_large("unpacked zip", limit, f"more than {written} bytes unpacked",
                                            "send a smaller series")
                        out.write(chunk)
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError) as err:
            raise Problem(400, "the zip is damaged or uses an unsupported method", "a plain (deflate) zip",
                          f"{type(err).__name__}: {err}", "zip the series again") from None


def count_voxels(scan: Path, kind: ScanKind) -> int:
    """Voxels (channels included) the scan's header claims, read without its data.

    Raises:
        Problem: 422 for a header that cannot be read, or one that points at another file.
    """
    try:
        if kind in (ScanKind.NIFTI, ScanKind.NIFTI_GZ):
            import nibabel as nib

            shape = nib.load(str(scan)).header.get_data_shape()  # type: ignore[attr-defined]
        elif kind == ScanKind.PNG:
            from PIL import Image

            with Image.open(scan) as image:
                shape = (*image.size, len(image.getbands()))
        else:
            shape = _sitk_shape(scan, kind)
    except Problem:
        raise
    except Exception as err:  # noqa: BLE001 - any reader failure is the file's
        raise Problem(422, "the scan's header cannot be read", FORMATS_TEXT, f"{type(err).__name__}: "
                      f"{str(err).strip().splitlines()[-1][:300] if str(err).strip() else ''}",
                      "check that the file opens in a viewer (ITK-SNAP, 3D Slicer) and send it again") from None
    voxels = 1
    for size in shape:
        voxels *= max(int(size), 0)
    return voxels


def _sitk_shape(scan: Path, kind: ScanKind) -> tuple[int, ...]:
    import SimpleITK as sitk

    if kind in (ScanKind.NRRD, ScanKind.METAIMAGE):
        _refuse_detached_data(scan, kind)
    if kind == ScanKind.DICOM_ZIP:
        files = sorted(scan.iterdir())
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(files[0]))
        reader.ReadImageInformation()
        return (*reader.GetSize()[:2], len(files), reader.GetNumberOfComponents())
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(scan))
    reader.ReadImageInformation()
    return (*reader.GetSize(), reader.GetNumberOfComponents())


def _refuse_detached_data(scan: Path, kind: ScanKind) -> None:
    """An NRRD or MHA header naming a data file would make the reader open a server file of the client's choice."""
    with open(scan, "rb") as fh:
        head = fh.read(65536)
    text = head.split(b"\n\n", 1)[0] if kind == ScanKind.NRRD else head
    lowered = text.decode("latin-1").lower()
    if kind == ScanKind.NRRD:
        detached = re.search(r"^\s*data ?file\s*:", lowered, re.M) is not None
    else:
        match = re.search(r"^\s*elementdatafile\s*=\s*(\S+)", lowered, re.M)
        detached = match is None or match.group(1) != "local"
    if detached:
        raise Problem(422, "the header names a separate data file, which a server upload cannot have",
                      "the image data inline (NRRD without 'data file:', MetaImage with ElementDataFile = LOCAL)",
                      "a detached header", "save as .nrrd or .mha with the data inside (e.g. SimpleITK.WriteImage)")


def accept(body: Path, folder: Path, limits: ServeLimits) -> Scan:
    """Recognise ``body`` and lay it out in ``folder`` as the scan to predict (blocking: run in a thread).

    Raises:
        Problem: 415 unknown format, 400 damaged archive, 413 past a limit, 422 bad header or too many voxels.
    """
    kind = sniff(body)
    if kind is None:
        raise Problem(415, "the upload is not a format this server reads", FORMATS_TEXT,
                      "bytes that start like none of them", "send the scan file itself (not a link or an HTML page)")
    scan = folder / f"scan{kind.value}"
    if kind == ScanKind.DICOM_ZIP:
        scan = folder / "scan"
        unzip_series(body, scan, limits)
        body.unlink()
    else:
        shutil.move(body, scan)
        if kind == ScanKind.NIFTI_GZ:
            check_gzip(scan, folder / "unpacked.check", limits)
    voxels = count_voxels(scan, kind)
    if voxels > limits.max_voxels:
        raise Problem(413, "the scan has more voxels than this server predicts", f"at most {limits.max_voxels} voxels",
                      f"{voxels} voxels in its header", "crop or downsample the scan, or ask the operator to raise "
                      "--max-voxels")
    if voxels == 0:
        raise Problem(422, "the scan's header says it has no voxels", "a shape with every size at least 1",
                      "a zero size", "export the scan again")
    return Scan(kind, scan, voxels)
