"""Building a manifest: cases from a folder's layout, nnU-Net's split policy (every training case in
``train`` with k-fold cross-validation folds; ``test`` only from a test folder or when asked), hashes,
and the sidecar that remembers the folder."""

from __future__ import annotations

import random
import re
from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from medseg.data.layouts import DatasetLayout, detect_layout
from medseg.data.manifest import Case, Manifest, sha256_of, write_manifest
from medseg.data.sidecar import ManifestInfo, write_sidecar
from medseg.errors import ManifestError

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
