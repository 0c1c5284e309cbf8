"""Manifests: discovery in MSD / nnU-Net v2 / images+labels layouts, seeded subject-grouped splits,
CSV reading errors, the write/read round trip and ``medseg manifest build``."""

from __future__ import annotations

import csv
import hashlib
import json
from collections import defaultdict
from pathlib import Path

import nibabel as nib
import pytest

from medseg.cli import main
from medseg.data.build import build_manifest
from medseg.data.folders import discover_cases
from medseg.data.manifest import COLUMNS, Case, Manifest, read_manifest, write_manifest
from medseg.errors import ManifestError
from tests.conftest import make_case

SHAPE = (9, 11, 7)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(path: Path, seed: int = 0, label: bool = False) -> Path:
    """Write a tiny synthetic NIfTI (image or label) at ``path``."""
    image, lab, affine = make_case(SHAPE, seed=seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(lab if label else image, affine), path)
    return path


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _split_of(manifest: Manifest) -> dict[str, str]:
    return {c.case_id: c.split for c in manifest.cases}


# ------------------------------------------------------------------------------------ MSD layout


def test_msd_layout_lists_every_case_with_relative_paths_and_hashes(msd_dataset: Path,
                                                                    tmp_path: Path) -> None:
    out = tmp_path / "m.csv"
    manifest = build_manifest(msd_dataset, out, seed=0)
    assert [c.case_id for c in manifest.cases] == [f"case_{i:03d}" for i in range(8)]
    for case in manifest.cases:
        assert case.images == (f"imagesTr/{case.case_id}.nii.gz",)
        assert case.label == f"labelsTr/{case.case_id}.nii.gz"
        assert case.image_sha256 == (_sha256(msd_dataset / case.images[0]),)
        assert case.label_sha256 == _sha256(msd_dataset / case.label)
    rows = _rows(out)
    assert list(rows[0]) == list(COLUMNS)
    assert len(rows) == 8
    for row in rows:
        assert not Path(row["image"]).is_absolute() and not row["image"].startswith(".")
        assert row["image_sha256"] == _sha256(msd_dataset / row["image"])
        assert row["label_sha256"] == _sha256(msd_dataset / row["label"])


def test_seeded_splits_are_reproducible_and_depend_on_the_seed(msd_dataset: Path, tmp_path: Path) -> None:
    first = build_manifest(msd_dataset, tmp_path / "a.csv", seed=3, val_fraction=0.25)
    again = build_manifest(msd_dataset, tmp_path / "b.csv", seed=3, val_fraction=0.25)
    other = build_manifest(msd_dataset, tmp_path / "c.csv", seed=4, val_fraction=0.25)
    assert _split_of(first) == _split_of(again)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()
    assert _split_of(first) != _split_of(other)


def test_val_and_test_fractions_are_respected(msd_dataset: Path, tmp_path: Path) -> None:
    manifest = build_manifest(msd_dataset, tmp_path / "m.csv", seed=0, val_fraction=0.25, test_fraction=0.25)
    counts = {name: len(manifest.split(name)) for name in ("train", "val", "test")}
    assert counts == {"train": 4, "val": 2, "test": 2}
    assert all(c.fold is None for c in manifest.cases)


# ------------------------------------------------------------------------------------ nnU-Net v2 layout


@pytest.mark.parametrize("v2_dataset_json", [False, True], ids=["no-dataset-json", "v2-dataset-json"])
def test_nnunet_v2_channels_are_grouped_in_channel_order(tmp_path: Path, v2_dataset_json: bool) -> None:
    root = tmp_path / "Dataset001"
    # written in reverse so the order cannot come from creation time
    for channel in (1, 0):
        _save(root / "imagesTr" / f"caseA_{channel:04d}.nii.gz", seed=channel)
        _save(root / "imagesTr" / f"caseB_{channel:04d}.nii.gz", seed=10 + channel)
    _save(root / "labelsTr" / "caseA.nii.gz", label=True)
    _save(root / "labelsTr" / "caseB.nii.gz", seed=10, label=True)
    if v2_dataset_json:  # nnU-Net v2 style: no "training" list, so the folders are scanned
        (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1", "1": "T2"},
                                                       "labels": {"background": 0, "a": 1, "b": 2},
                                                       "numTraining": 2, "file_ending": ".nii.gz"}))
    out = tmp_path / "m.csv"
    manifest = build_manifest(root, out, val_fraction=0.5)
    by_id = {c.case_id: c for c in manifest.cases}
    assert sorted(by_id) == ["caseA", "caseB"]
    case = by_id["caseA"]
    assert case.images == ("imagesTr/caseA_0000.nii.gz", "imagesTr/caseA_0001.nii.gz")
    assert case.label == "labelsTr/caseA.nii.gz"
    assert case.image_sha256 == tuple(_sha256(root / p) for p in case.images)
    row = next(r for r in _rows(out) if r["case_id"] == "caseA")
    assert row["image"] == "imagesTr/caseA_0000.nii.gz;imagesTr/caseA_0001.nii.gz"
    assert row["image_sha256"] == ";".join(case.image_sha256)


# ------------------------------------------------------------------------------------ images/ + labels/


def test_images_labels_pair_leaves_label_blank_for_an_unlabelled_image(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    for i, name in enumerate(("a", "b", "c")):
        _save(root / "images" / f"{name}.nii.gz", seed=i)
    _save(root / "labels" / "a.nii.gz", label=True)
    _save(root / "labels" / "c.nii.gz", seed=2, label=True)
    out = tmp_path / "m.csv"
    by_id = {c.case_id: c for c in build_manifest(root, out).cases}
    assert by_id["a"].images == ("images/a.nii.gz",) and by_id["a"].label == "labels/a.nii.gz"
    assert by_id["b"].label is None and by_id["b"].label_sha256 is None
    row = next(r for r in _rows(out) if r["case_id"] == "b")
    assert row["label"] == "" and row["label_sha256"] == ""


def test_label_without_image_is_named(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _save(root / "images" / "a.nii.gz")
    _save(root / "labels" / "a.nii.gz", label=True)
    _save(root / "labels" / "orphan_7.nii.gz", label=True)
    with pytest.raises(ManifestError, match=r"label\(s\) without an image: \['orphan_7'\]"):
        discover_cases(root)


def test_unknown_layout_lists_the_expected_layouts(tmp_path: Path) -> None:
    root = tmp_path / "weird"
    _save(root / "scans" / "a.nii.gz")
    with pytest.raises(ManifestError, match=r"no known layout.*imagesTr/ \+ labelsTr/.*images/ \+ labels/"):
        build_manifest(root, tmp_path / "m.csv")
    assert not (tmp_path / "m.csv").exists()


# ------------------------------------------------------------------------------------ subjects


SUBJECT_PATTERN = r"(?P<subject>sub\d+)_"


def _subject_dataset(root: Path, n_subjects: int = 8) -> Path:
    """images/ + labels/ with 1-3 sessions per subject, e.g. ``sub03_ses2``."""
    for s in range(n_subjects):
        for session in range(1 + s % 3):
            name = f"sub{s:02d}_ses{session}.nii.gz"
            _save(root / "images" / name, seed=s)
            _save(root / "labels" / name, seed=s, label=True)
    return root


def _subject_groups(manifest: Manifest, key: str) -> dict[str, set[object]]:
    groups: dict[str, set[object]] = defaultdict(set)
    for c in manifest.cases:
        groups[c.subject_id or ""].add(getattr(c, key))
    return groups


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subject_never_straddles_two_splits(tmp_path: Path, seed: int) -> None:
    root = _subject_dataset(tmp_path / "subj")
    manifest = build_manifest(root, tmp_path / "m.csv", seed=seed, val_fraction=0.25, test_fraction=0.25,
                              subject_pattern=SUBJECT_PATTERN)
    assert all(c.subject_id == c.case_id.split("_")[0] for c in manifest.cases)
    groups = _subject_groups(manifest, "split")
    assert len(groups) == 8
    assert all(len(splits) == 1 for splits in groups.values()), groups
    subjects_per_split = defaultdict(set)
    for subject, splits in groups.items():
        subjects_per_split[next(iter(splits))].add(subject)
    assert {k: len(v) for k, v in subjects_per_split.items()} == {"train": 4, "val": 2, "test": 2}


def test_folds_keep_each_subject_in_one_fold_and_test_subjects_get_fold_minus_one(tmp_path: Path) -> None:
    root = _subject_dataset(tmp_path / "subj")
    manifest = build_manifest(root, tmp_path / "m.csv", seed=5, test_fraction=0.25, folds=3,
                              subject_pattern=SUBJECT_PATTERN)
    folds = _subject_groups(manifest, "fold")
    assert all(len(f) == 1 for f in folds.values()), folds
    for case in manifest.cases:
        if case.split == "test":
            assert case.fold == -1
        else:
            assert case.split == "train" and case.fold in {0, 1, 2}
    assert sum(1 for f in folds.values() if f == {-1}) == 2
    assert {next(iter(f)) for f in folds.values()} == {-1, 0, 1, 2}
    for fold in range(3):
        train = {c.subject for c in manifest.select("train", fold=fold, role="train")}
        val = {c.subject for c in manifest.select("train", fold=fold, role="val")}
        assert val and train and not train & val


def test_subject_pattern_without_a_match_names_the_case(tmp_path: Path) -> None:
    root = _subject_dataset(tmp_path / "subj", n_subjects=2)
    _save(root / "images" / "phantom.nii.gz")
    with pytest.raises(ManifestError, match=r"finds no 'subject' group in 'phantom'"):
        build_manifest(root, tmp_path / "m.csv", subject_pattern=SUBJECT_PATTERN)


def test_cli_subject_pattern_groups_splits(tmp_path: Path) -> None:
    root = _subject_dataset(tmp_path / "subj")
    out = tmp_path / "m.csv"
    code = main(["manifest", "build", "--from", str(root), "--out", str(out), "--seed", "7",
                 "--val-fraction", "0.25", "--subject-pattern", SUBJECT_PATTERN])
    assert code == 0
    groups = _subject_groups(read_manifest(out), "split")
    assert len(groups) == 8 and all(len(s) == 1 for s in groups.values())


# ------------------------------------------------------------------------------------ read_manifest errors


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_missing_manifest_suggests_how_to_build_one(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match=
                       r"Manifest not found: .*nope\.csv.*`medseg manifest build --from"):
        read_manifest(tmp_path / "nope.csv")


def test_missing_required_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "m.csv", "case_id,image\na,imagesTr/a.nii.gz\n")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['split'\]"):
        read_manifest(path)


def test_unknown_column(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "m.csv", "case_id,image,split,sex\na,imagesTr/a.nii.gz,train,F\n")
    with pytest.raises(ManifestError, match=r"unknown column\(s\) \['sex'\]; valid columns are"):
        read_manifest(path)


def test_duplicate_case_id_names_both_lines(tmp_path: Path) -> None:
    text = "case_id,image,split\na,a.nii.gz,train\nb,b.nii.gz,val\na,c.nii.gz,train\n"
    path = _write_csv(tmp_path / "m.csv", text)
    with pytest.raises(ManifestError, match=r"m\.csv:4: case_id 'a' already used on line 2"):
        read_manifest(path)


def test_bad_fold_value(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "m.csv", "case_id,image,split,fold\na,a.nii.gz,train,one\n")
    with pytest.raises(ManifestError, match=r"m\.csv:2: fold must be an integer, got 'one'"):
        read_manifest(path)


def test_header_only_manifest(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "m.csv", "case_id,image,split\n")
    with pytest.raises(ManifestError, match="no cases"):
        read_manifest(path)


# ------------------------------------------------------------------------------------ round trip


def test_write_read_round_trip_preserves_every_field(tmp_path: Path) -> None:
    cases = (
        Case("c1", ("imagesTr/c1_0000.nii.gz", "imagesTr/c1_0001.nii.gz"), "labelsTr/c1.nii.gz", "train",
             fold=2, subject_id="sub01", image_sha256=("a" * 64, "b" * 64), label_sha256="c" * 64),
        Case("c2", ("images/c2.nii.gz",), None, "test", fold=-1, subject_id=None,
             image_sha256=("d" * 64,), label_sha256=None),
        Case("c3", ("dicom/c3",), "labels/c3 with space.nrrd", "val"),
    )
    path = write_manifest(Manifest(None, cases), tmp_path / "m.csv")
    back = read_manifest(path)
    assert back.path == path
    assert back.cases == cases
    assert write_manifest(back, tmp_path / "again.csv").read_text() == path.read_text()


# ------------------------------------------------------------------------------------ CLI


def test_cli_manifest_build_writes_the_csv(msd_dataset: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "manifests" / "synthetic.csv"
    code = main(["manifest", "build", "--from", str(msd_dataset), "--out", str(out), "--folds", "4"])
    assert code == 0
    manifest = read_manifest(out)
    assert len(manifest.cases) == 8
    assert sorted({c.fold for c in manifest.cases}) == [0, 1, 2, 3]
    assert "8 cases" in capsys.readouterr().out


def test_cli_manifest_build_unknown_layout_exits_with_usage_error(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    code = main(["manifest", "build", "--from", str(tmp_path / "empty"), "--out", str(tmp_path / "m.csv")])
    assert code == 2
    assert "no known layout" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ regressions


def test_images_masks_pair_finds_the_masks(tmp_path: Path) -> None:
    root = tmp_path / "plain"
    _save(root / "images" / "a.nii.gz")
    _save(root / "masks" / "a.nii.gz", label=True)
    assert [c.label for c in discover_cases(root)] == ["masks/a.nii.gz"]


def test_msd_label_listed_but_missing_is_a_manifest_error(msd_dataset: Path, tmp_path: Path) -> None:
    (msd_dataset / "labelsTr" / "case_003.nii.gz").unlink()
    with pytest.raises(ManifestError, match="case_003"):
        build_manifest(msd_dataset, tmp_path / "m.csv")


def test_a_case_named_like_a_formula_is_quoted_for_spreadsheets_and_read_back_as_it_was(tmp_path: Path) -> None:
    """Case ids and paths come from file names anyone chose: ``=HYPERLINK(...)`` must not run when
    the manifest is opened in a spreadsheet, and must read back unchanged."""
    cases = [Case("=HYPERLINK(\"http://x\")", ("@img.nii.gz",), "-lbl.nii.gz", "train", 0, "+s1", ("a",), "b"),
             Case("plain", ("img.nii.gz",), None, "test", None, None, ("c",), None)]
    path = write_manifest(cases, tmp_path / "m.csv")
    text = path.read_text()
    assert "'=HYPERLINK" in text and "'@img.nii.gz" in text and "'-lbl.nii.gz" in text and "'+s1" in text
    back = read_manifest(path).cases
    assert back[0].case_id == "=HYPERLINK(\"http://x\")" and back[0].images == ("@img.nii.gz",)
    assert back[0].label == "-lbl.nii.gz" and back[0].subject_id == "+s1" and back[1].case_id == "plain"
