"""A folder of scans as a pretraining manifest: every scan a case, no labels, one split.

Scans are found by the same discovery as ``medseg predict`` (:func:`medseg.io.discovery.discover`:
NIfTI, NRRD, MHA, DICOM series, nnU-Net channel files), so whatever predict reads, pretraining reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medseg.data.manifest import Case, Manifest, read_manifest, write_manifest
from medseg.errors import ManifestError
from medseg.io.discovery import discover
from medseg.io.formats import FORMATS


def folder_manifest(folder: Path, out: Path, channels: int = 1) -> Path:
    """Write ``out``, a manifest of every scan under ``folder`` (paths relative to ``folder``).

    Args:
        folder: a folder of scans, searched recursively.
        out: the manifest CSV to write (the same folder gives the same file, so a resumed run
            finds what it started with).
        channels: input channels per case (nnU-Net ``_0000`` files grouped by this).

    Raises:
        ManifestError: ``folder`` is missing, holds no scan, or a scan cannot be grouped (the message
            names the files, what was expected and what was found).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"pretrain: {folder} is not a folder. Expected: a folder of scans (or a manifest CSV). "
                            f"Got: {'a file' if folder.exists() else 'nothing at that path'}. File: {folder}")
    found = discover(folder, channels)
    problems = [case for case in found.cases if case.problem]
    if problems:
        shown = "; ".join(str(case.problem) for case in problems[:5])
        raise ManifestError(f"pretrain: {len(problems)} scan(s) under {folder} cannot be read as cases: {shown}. "
                            "Fix: complete or remove them")
    if not found.cases:
        raise ManifestError(f"pretrain: no scan under {folder}. Expected: image files ({FORMATS.describe()}) or "
                            f"DICOM series. Got: {_listing(folder)}. File: {folder}")
    cases = [Case(case.case_id, tuple(str(p.relative_to(folder)) for p in case.paths), None, "train")
             for case in found.cases]
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_manifest(cases, out)


def _listing(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir())
    if not names:
        return "an empty folder"
    return f"{len(names)} other file(s): {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


@dataclass(frozen=True)
class EveryImage:
    """A manifest of every image a planned pretraining learns from, and how many of each kind it holds."""

    manifest: Path
    unlabelled: int
    labelled: int


def every_image_manifest(unlabelled: Path, labelled: Manifest, root: Path, out: Path, channels: int = 1) -> EveryImage:
    """Write ``out``: the scans under the ``unlabelled`` folder and the images of ``labelled``'s
    training cases (its test split left out, so that test scores stay those of unseen scans), as
    absolute paths, one split, no labels. A scan of both is counted once, as labelled.

    Raises:
        ManifestError: as :func:`folder_manifest`, for the ``unlabelled`` folder.
    """
    scans = read_manifest(folder_manifest(unlabelled, out.with_name(out.stem + "_scans.csv"), channels))
    training = [c for c in labelled.cases if c.split != "test" and c.label]
    cases = [Case(c.case_id, tuple(str(p.resolve()) for p in c.image_paths(root)), None, "train") for c in training]
    seen = {case.images for case in cases}
    extra = [Case(f"unlabelled_{c.case_id}", images, None, "train") for c in scans.cases
             if (images := tuple(str(p.resolve()) for p in c.image_paths(unlabelled))) not in seen]
    write_manifest([*cases, *extra], out)
    return EveryImage(out, len(extra), len(cases))
