"""Data manifests: one CSV row per case with paths, split/fold, subject and content hashes.

Columns: ``case_id, image, label, split, fold, subject_id, image_sha256, label_sha256``.
Several input channels are ``;``-separated in ``image`` (and, in the same order, in
``image_sha256``). Paths are relative to a data root given in the config or ``$MEDSEG_DATA_ROOT``,
so one manifest serves every machine.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import ManifestError
from medseg.io.atomic import atomic_write_text
from medseg.io.csv_cells import csv_text, unescape_row

COLUMNS = ("case_id", "image", "label", "split", "fold", "subject_id", "image_sha256", "label_sha256")
REQUIRED_COLUMNS = ("case_id", "image", "split")
CHANNEL_SEP = ";"
#: Extra columns whose names start with this hold regression targets (read by :mod:`medseg.data.targets`).
TARGET_PREFIX = "target"



@dataclass(frozen=True)
class Case:
    """One row of a manifest."""

    case_id: str
    images: tuple[str, ...]
    label: str | None
    split: str
    fold: int | None = None
    subject_id: str | None = None
    image_sha256: tuple[str, ...] = ()
    label_sha256: str | None = None

    @property
    def subject(self) -> str:
        return self.subject_id or self.case_id

    def image_paths(self, root: Path) -> list[Path]:
        return [root / p for p in self.images]

    def label_path(self, root: Path) -> Path | None:
        return root / self.label if self.label else None


@dataclass(frozen=True)
class Manifest:
    path: Path | None
    cases: tuple[Case, ...]

    def split(self, name: str) -> list[Case]:
        return [c for c in self.cases if c.split == name]

    def select(self, split: str, fold: int | None = None, role: str = "train") -> list[Case]:
        """Cases of a split; with ``fold`` set, ``train`` means all other folds and ``val`` that fold."""
        if fold is None:
            return self.split(split)
        pool = [c for c in self.cases if c.fold is not None and c.fold >= 0]
        return [c for c in pool if (c.fold == fold) == (role == "val")]


def sha256_of(path: Path) -> str:
    """sha256 of a file, or of a DICOM folder's sorted member hashes."""
    if path.is_dir():
        digest = hashlib.sha256()
        for child in sorted(p for p in path.iterdir() if p.is_file()):
            digest.update(child.name.encode())
            digest.update(sha256_of(child).encode())
        return digest.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes (the manifest's own identity in MLflow tags)."""
    return sha256_of(path)


# ------------------------------------------------------------------------------------ read/write


def read_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest CSV.

    Raises:
        ManifestError: missing file, missing columns, empty or duplicate case ids, bad fold values.
    """
    path = Path(path)
    if not path.is_file():
        raise ManifestError(
            f"Manifest not found: {path}. Build one with `medseg manifest build --from DATA_DIR --out {path}`."
        )
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing column(s) {missing}; expected at least {list(REQUIRED_COLUMNS)}, got {header}")
        unknown = [c for c in header if c not in COLUMNS and not c.startswith(TARGET_PREFIX)]
        if unknown:
            raise ManifestError(f"{path}: unknown column(s) {unknown}; valid columns are {list(COLUMNS)} "
                                f"and regression targets named {TARGET_PREFIX}*")
        cases: list[Case] = []
        seen: dict[str, int] = {}
        for line_no, escaped in enumerate(reader, start=2):
            row = unescape_row(escaped)  # a cell medseg quoted so that a spreadsheet shows it as text
            case_id = (row.get("case_id") or "").strip()
            if not case_id:
                raise ManifestError(f"{path}:{line_no}: empty case_id")
            if case_id in seen:
                raise ManifestError(f"{path}:{line_no}: case_id {case_id!r} already used on line {seen[case_id]}")
            seen[case_id] = line_no
            images = tuple(p.strip() for p in (row.get("image") or "").split(CHANNEL_SEP) if p.strip())
            if not images:
                raise ManifestError(f"{path}:{line_no}: case {case_id!r} has no image path")
            fold_text = (row.get("fold") or "").strip()
            try:
                fold = int(fold_text) if fold_text else None
            except ValueError:
                raise ManifestError(f"{path}:{line_no}: fold must be an integer, got {fold_text!r}") from None
            hashes = tuple(h.strip() for h in (row.get("image_sha256") or "").split(CHANNEL_SEP) if h.strip())
            cases.append(
                Case(
                    case_id=case_id,
                    images=images,
                    label=(row.get("label") or "").strip() or None,
                    split=(row.get("split") or "").strip(),
                    fold=fold,
                    subject_id=(row.get("subject_id") or "").strip() or None,
                    image_sha256=hashes,
                    label_sha256=(row.get("label_sha256") or "").strip() or None,
                )
            )
    if not cases:
        raise ManifestError(f"{path}: no cases (only a header line)")
    return Manifest(path=path, cases=tuple(cases))


def write_manifest(manifest: Manifest | Sequence[Case], path: str | Path) -> Path:
    """Write a manifest CSV atomically, removing the temp files a killed earlier write left beside it.

    A text cell a spreadsheet would run as a formula (a case id or path starting with ``=``, ``@``,
    ...) is written with a ``'`` in front (:mod:`medseg.io.csv_cells`); :func:`read_manifest` takes it off."""
    cases = manifest.cases if isinstance(manifest, Manifest) else tuple(manifest)
    rows = [dict(zip(COLUMNS, (c.case_id, CHANNEL_SEP.join(c.images), c.label or "", c.split,
                               "" if c.fold is None else c.fold, c.subject_id or "", CHANNEL_SEP.join(c.image_sha256),
                               c.label_sha256 or ""), strict=True)) for c in cases]
    _remove_stale_temporaries(Path(path))
    return atomic_write_text(path, csv_text(rows, COLUMNS))


def _remove_stale_temporaries(path: Path) -> None:
    """Remove the temp files of earlier writes of ``path`` that were killed before their rename.

    :func:`~medseg.io.atomic.atomic_path` writes ``.<name>.<random>.tmp<suffixes>`` beside ``path``
    and renames it onto ``path``; a SIGKILL in between leaves the temp file, which nothing else
    would ever remove. Only that exact pattern is removed (not the temp files of other outputs in
    the folder). Two builds writing one manifest at the same moment race in any case; here the
    later one may remove the other's temp file, which then fails instead of overwriting.
    """
    stale = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]+" + re.escape(".tmp" + "".join(path.suffixes)))
    if not path.parent.is_dir():
        return
    for candidate in path.parent.iterdir():
        if stale.fullmatch(candidate.name) and candidate.is_file():
            candidate.unlink(missing_ok=True)


def manifest_summary(manifest: Manifest) -> dict[str, int]:
    """Cases per split (or fold) of a manifest."""
    counts: dict[str, int] = {}
    for case in manifest.cases:
        key = case.split if case.fold is None or case.fold < 0 else f"fold {case.fold}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
