"""Data manifests: one CSV row per case with paths, split/fold, subject and content hashes.

Columns: ``case_id, image, label, split, fold, subject_id, image_sha256, label_sha256``.
Several input channels are ``;``-separated in ``image`` (and, in the same order, in
``image_sha256``). Paths are relative to a data root given in the config or ``$MEDSEG_DATA_ROOT``,
so one manifest serves every machine.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import posixpath
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.data.sidecar import ManifestInfo, write_sidecar
from medseg.errors import ManifestError
from medseg.io.atomic import atomic_write_text
from medseg.io.discovery import FileGroup, group_channel_files
from medseg.io.formats import FORMATS, strip_volume_suffix

COLUMNS = ("case_id", "image", "label", "split", "fold", "subject_id", "image_sha256", "label_sha256")
REQUIRED_COLUMNS = ("case_id", "image", "split")
CHANNEL_SEP = ";"

if TYPE_CHECKING:
    from medseg.data.layouts import DatasetLayout


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
        unknown = [c for c in header if c not in COLUMNS]
        if unknown:
            raise ManifestError(f"{path}: unknown column(s) {unknown}; valid columns are {list(COLUMNS)}")
        cases: list[Case] = []
        seen: dict[str, int] = {}
        for line_no, row in enumerate(reader, start=2):
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
    """Write a manifest CSV atomically, removing the temp files a killed earlier write left beside it."""
    cases = manifest.cases if isinstance(manifest, Manifest) else tuple(manifest)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for c in cases:
        writer.writerow(
            [
                c.case_id,
                CHANNEL_SEP.join(c.images),
                c.label or "",
                c.split,
                "" if c.fold is None else c.fold,
                c.subject_id or "",
                CHANNEL_SEP.join(c.image_sha256),
                c.label_sha256 or "",
            ]
        )
    _remove_stale_temporaries(Path(path))
    return atomic_write_text(path, buffer.getvalue())


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


# ------------------------------------------------------------------------------------ discovery


def _volumes_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, by the suffixes of the format registry (hidden files skipped)."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and FORMATS.by_suffix(p.name) is not None and not p.name.startswith("."))


def discover_cases(root: Path) -> list[Case]:
    """Find image/label pairs under ``root`` in MSD, nnU-Net v2 or plain images/labels layout.

    (:func:`medseg.data.layouts.detect_layout` knows these and more layouts: ImageFolder, CSV, case folders.)

    Raises:
        ManifestError: the folder matches none of the layouts, or an image/label pair is incomplete.
    """
    root = Path(root)
    if not root.is_dir():
        raise ManifestError(f"--from {root}: not a folder")
    found = discover_paired_layout(root)
    if found is None:
        raise ManifestError(
            f"{root}: no known layout. Expected imagesTr/ + labelsTr/ (MSD or nnU-Net, optional dataset.json) "
            "or images/ + labels/ folders holding files with the same names."
        )
    return found[1]


def discover_paired_layout(root: Path) -> tuple[str, list[Case]] | None:
    """The cases of an MSD (``"msd"``), nnU-Net (``"nnunet"``) or images/labels (``"images_labels"``)
    folder, with the layout's name; None when ``root`` is none of these.

    Raises:
        ManifestError: the folder has one of these layouts but an image/label pair is incomplete.
    """
    root = Path(root)
    dataset_json = root / "dataset.json"
    if (root / "imagesTr").is_dir():
        meta = read_dataset_json(dataset_json) if dataset_json.is_file() else {}
        if isinstance(meta.get("training"), list) and meta["training"]:
            return "msd", _with_test_folder(root, _from_msd_json(root, meta["training"]))
        return "nnunet", _with_test_folder(root, _from_nnunet_folders(root, root / "imagesTr", root / "labelsTr"))
    for images_name, labels_name in (("images", "labels"), ("images", "masks"), ("imgs", "masks")):
        if (root / images_name).is_dir() and (root / labels_name).is_dir():
            return "images_labels", _from_nnunet_folders(root, root / images_name, root / labels_name,
                                                         channel_suffix=False)
    if (root / "images").is_dir():  # images without labels (e.g. a test set)
        return "images_labels", _from_nnunet_folders(root, root / "images", root / "labels", channel_suffix=False)
    return None


def _with_test_folder(root: Path, training: list[Case]) -> list[Case]:
    """The training cases plus, when ``imagesTs/`` has labels in ``labelsTs/``, those as the ``test``
    split (nnU-Net tests only there). Unlabelled test images are left to ``medseg predict``."""
    if not (root / "imagesTs").is_dir() or not (root / "labelsTs").is_dir():
        return training
    test = [replace(c, split="test") for c in _from_nnunet_folders(root, root / "imagesTs", root / "labelsTs")
            if c.label]
    if not test:
        return training
    clash = sorted({c.case_id for c in training} & {c.case_id for c in test})
    if clash:
        raise ManifestError(f"{root}: case(s) {clash[:5]} are in both imagesTr/ and imagesTs/; a case is either "
                            "trained on or tested on: rename or remove one copy")
    return [replace(c, split="train") for c in training] + test


def read_dataset_json(path: Path) -> dict:
    """A dataset.json (MSD or nnU-Net) as a dict.

    Raises:
        ManifestError: not valid JSON, or not a JSON object.
    """
    try:
        meta = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise ManifestError(f"{path}: not valid JSON ({err}); fix or remove it") from None
    if not isinstance(meta, dict):
        raise ManifestError(f"{path}: Expected a JSON object (MSD or nnU-Net dataset.json). Got a "
                            f"{type(meta).__name__}. Fix or remove the file.")
    return meta


def _from_msd_json(root: Path, training: list[dict[str, str]]) -> list[Case]:
    cases = []
    for index, item in enumerate(training):
        if not isinstance(item, dict) or not item.get("image"):
            raise ManifestError(f"{root / 'dataset.json'}: training[{index}] has no 'image' entry: {item!r}")
        image = posixpath.normpath(item["image"])  # "./imagesTr/x.nii.gz" -> "imagesTr/x.nii.gz"
        label = posixpath.normpath(item["label"]) if item.get("label") else None
        for listed in (image, label):
            if listed is not None and not (root / listed).exists():
                raise ManifestError(f"{root / 'dataset.json'}: lists {listed} but {root / listed} does not exist; "
                                    "fix dataset.json or restore the file")
        cases.append(Case(strip_volume_suffix(Path(image).name), (image,), label, ""))
    return cases


def dataset_json_channel_count(root: Path) -> int | None:
    """The number of input channels ``<root>/dataset.json`` names (nnU-Net v2 ``channel_names``, MSD
    ``modality``), or None without one: it decides which files are one case's channel files.

    Raises:
        ManifestError: dataset.json is not valid JSON.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return None
    meta = read_dataset_json(path)
    entry = meta.get("channel_names") or meta.get("modality")
    return len(entry) if isinstance(entry, dict) and entry else None


def _from_nnunet_folders(root: Path, images: Path, labels: Path, channel_suffix: bool = True) -> list[Case]:
    """The cases of an images folder and their labels (same name). With ``channel_suffix``, nnU-Net
    channel files are grouped by :func:`medseg.io.discovery.group_channel_files`, with dataset.json's
    channel count when there is one."""
    volumes = _volumes_in(images)
    if not volumes:
        raise ManifestError(f"{images}: no image files; expected one of: {FORMATS.describe()}")
    if channel_suffix:
        groups, _ = group_channel_files(volumes, dataset_json_channel_count(root))
    else:  # images/ + labels/: the label has the image's own name, _0000 included
        groups = [FileGroup(strip_volume_suffix(p.name), (p,)) for p in volumes]
    failed = [g.problem for g in groups if g.problem]
    if failed:
        raise ManifestError(f"{images}: {len(failed)} case(s) with missing channel files. {failed[0]}"
                            + (f" ({len(failed) - 1} more such case(s).)" if len(failed) > 1 else ""))
    grouped: dict[str, tuple[Path, ...]] = {}
    for group in groups:
        if group.name in grouped:
            raise ManifestError(f"{images}: {grouped[group.name][0].name} and {group.files[0].name} both name case "
                                f"{group.name!r}. Rename or remove one of them.")
        grouped[group.name] = group.files
    label_files = {strip_volume_suffix(p.name): p for p in _volumes_in(labels)} if labels.is_dir() else {}
    cases = []
    for case_id, paths in sorted(grouped.items()):
        label = label_files.get(case_id)
        cases.append(
            Case(
                case_id,
                tuple(p.relative_to(root).as_posix() for p in paths),
                label.relative_to(root).as_posix() if label else None,
                "",
            )
        )
    orphans = sorted(set(label_files) - set(grouped))
    if orphans:
        raise ManifestError(f"{labels}: label(s) without an image: {orphans[:5]}{' ...' if len(orphans) > 5 else ''}")
    return cases


# ------------------------------------------------------------------------------------ splitting


#: nnU-Net's cross-validation: five folds, fewer when there are fewer subjects.
DEFAULT_FOLDS = 5


def default_folds(cases: Iterable[Case]) -> int | None:
    """How many folds a plan's manifest gets: five, or one per subject when there are fewer (the
    training cases of a layout's own ``train`` split when it has one); None below two subjects."""
    cases = list(cases)
    pool = [c for c in cases if c.split in ("", "train")] or cases
    subjects = len({c.subject for c in pool})
    return min(DEFAULT_FOLDS, subjects) if subjects >= 2 else None


def with_folds(manifest: Manifest, out: Path, folds: int = DEFAULT_FOLDS, seed: int = 0) -> Manifest:
    """A copy of ``manifest`` whose test cases stay as they are and whose other cases (train and val)
    are spread over ``folds`` cross-validation folds of split ``train`` (nnU-Net's split policy)."""
    test = [c for c in manifest.cases if c.split == "test"]
    rest = [replace(c, split="") for c in manifest.cases if c not in test]
    folded = {c.case_id: c for c in assign_splits(rest, seed=seed, folds=folds)}
    cases = tuple(folded.get(c.case_id) or replace(c, fold=-1) for c in manifest.cases)
    result = Manifest(path=Path(out), cases=cases)
    write_manifest(result, out)
    return result


def assign_splits(
    cases: Iterable[Case],
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    folds: int | None = None,
) -> list[Case]:
    """Seeded split grouped by subject, so one subject's cases never straddle two splits.

    With ``folds`` the non-test subjects get fold numbers 0..k-1 and split ``train``; each fold
    validates in turn (``data.fold``). Otherwise subjects go to train/val/test by fraction.
    """
    cases = list(cases)
    if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
        raise ManifestError(f"val ({val_fraction}) and test ({test_fraction}) fractions must be >= 0 and sum below 1")
    subjects = sorted({c.subject for c in cases})
    random.Random(seed).shuffle(subjects)
    n = len(subjects)
    n_test = round(n * test_fraction)
    test = set(subjects[:n_test])
    rest = subjects[n_test:]
    out: list[Case] = []
    if folds:
        if folds < 2 or folds > len(rest):
            raise ManifestError(f"--folds {folds}: need 2 <= folds <= number of non-test subjects ({len(rest)})")
        fold_of = {s: i % folds for i, s in enumerate(rest)}
        for c in cases:
            if c.subject in test:
                out.append(replace(c, split="test", fold=-1))
            else:
                out.append(replace(c, split="train", fold=fold_of[c.subject]))
        return out
    n_val = max(1, round(n * val_fraction)) if val_fraction > 0 else 0
    val = set(rest[:n_val])
    for c in cases:
        split = "test" if c.subject in test else "val" if c.subject in val else "train"
        out.append(replace(c, split=split))
    return out


def build_manifest(
    source: Path,
    out: Path,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    folds: int | None = None,
    subject_pattern: str | None = None,
    limit: int | None = None,
) -> Manifest:
    """Detect the layout of ``source`` (:func:`medseg.data.layouts.detect_layout`), then
    :func:`build_manifest_from_layout`.

    Args:
        source: dataset folder (the data root; manifest paths are relative to it), or a CSV of
            ``path,label[,split]`` rows (its folder is the data root).
        out: CSV to write.
        seed, val_fraction, test_fraction, folds, subject_pattern, limit: see
            :func:`build_manifest_from_layout`.
    """
    from medseg.data.layouts import detect_layout  # layouts builds on this module's discovery

    return build_manifest_from_layout(detect_layout(Path(source)), out, seed=seed, val_fraction=val_fraction,
                                      test_fraction=test_fraction, folds=folds, subject_pattern=subject_pattern,
                                      limit=limit)


def build_manifest_from_layout(
    layout: DatasetLayout,
    out: Path,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    folds: int | None = None,
    subject_pattern: str | None = None,
    limit: int | None = None,
) -> Manifest:
    """Hash the cases of a detected layout, split them and write ``out``.

    Splits the layout gives (ImageFolder ``train/val/test`` folders, a CSV's ``split`` column) are
    kept. When they hold no ``val`` cases and ``val_fraction`` (or ``folds``) asks for some, the
    validation cases (or folds) are drawn from the ``train`` cases, seeded and grouped by subject;
    ``test`` cases stay as given and ``test_fraction`` is not used. Without layout splits every
    case is split by :func:`assign_splits`.

    Args:
        layout: from :func:`medseg.data.layouts.detect_layout`; paths are relative to ``layout.root``.
        out: CSV to write.
        seed: split seed.
        val_fraction, test_fraction, folds: see :func:`assign_splits`.
        subject_pattern: regex with a group ``subject`` applied to the case id (e.g.
            ``(?P<subject>[^_]+)_``); default: each case is its own subject.
        limit: keep only the first N cases (sorted by id), e.g. for a demo subset.
    """
    source = layout.root
    cases = sorted(layout.cases, key=lambda c: c.case_id)
    if limit:
        cases = cases[:limit]
    if subject_pattern:
        try:
            regex = re.compile(subject_pattern)
        except re.error as err:
            raise ManifestError(f"--subject-pattern {subject_pattern!r}: not a valid regular expression ({err})") from None
        with_subjects = []
        for c in cases:
            match = regex.search(c.case_id)
            if not match or "subject" not in match.groupdict():
                raise ManifestError(f"--subject-pattern {subject_pattern!r} finds no 'subject' group in {c.case_id!r}")
            with_subjects.append(replace(c, subject_id=match["subject"]))
        cases = with_subjects
    hashed = [
        replace(
            c,
            image_sha256=tuple(sha256_of(source / p) for p in c.images),
            label_sha256=sha256_of(source / c.label) if c.label and layout.task_hint == "segmentation" else None,
        )
        for c in cases
    ]
    if any(c.split for c in hashed):
        split = _keep_layout_splits(hashed, seed=seed, val_fraction=val_fraction, folds=folds)
    else:
        split = assign_splits(hashed, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, folds=folds)
    manifest = Manifest(path=Path(out), cases=tuple(split))
    write_manifest(manifest, out)
    labelled = [c.label for c in split if c.label]
    write_sidecar(Path(out), ManifestInfo(root=layout.root, task=layout.task_hint, labels=layout.labels,
                                          channels=layout.channel_names, layout=layout.kind,
                                          class_labels=bool(labelled) and all(_is_int(v) for v in labelled)))
    return manifest


def _is_int(text: str) -> bool:
    return text.strip().lstrip("-").isdigit()


def _keep_layout_splits(cases: list[Case], seed: int, val_fraction: float, folds: int | None) -> list[Case]:
    """The layout's own splits; validation cases (or folds) drawn from ``train`` when it gives none."""
    if any(c.split == "val" for c in cases) or (not folds and val_fraction <= 0):
        return cases
    train = [c for c in cases if c.split == "train"]
    drawn = {c.case_id: c for c in assign_splits(train, seed=seed, val_fraction=val_fraction, folds=folds)}
    out = []
    for c in cases:
        if c.case_id in drawn:
            out.append(drawn[c.case_id])
        else:
            out.append(replace(c, fold=-1) if folds else c)
    return out
