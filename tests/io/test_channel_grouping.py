"""Which numbered files are one case's channels: a corpus of real-world names, and the cases each
must give for 1-, 2- and 4-channel models and with no channel count (``manifest build`` without
dataset.json). Issue #32: 624 MedMNIST exports ``test_0000`` .. ``test_0623`` were one case."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.data.build import build_manifest
from medseg.data.layouts import detect_layout
from medseg.errors import ManifestError
from medseg.io.discovery import MAX_GUESSED_CHANNELS, FileGroup, discover, group_channel_files
from medseg.io.formats import strip_volume_suffix
from tests.io.test_dicom_hostile import write_series


def numbered(stem: str, count: int, start: int = 0, ext: str = ".nii.gz") -> list[str]:
    return [f"{stem}_{i:04d}{ext}" for i in range(start, start + count)]


def each(names: list[str]) -> list[str]:
    """Every file a case of its own."""
    return sorted(strip_volume_suffix(n) for n in names)


def shown(groups: list[FileGroup]) -> list[str]:
    """``a[2]``: a case of 2 channel files; ``a!``: a failed case (channels missing); ``a``: one file."""
    return sorted(g.name + ("!" if g.problem else f"[{len(g.files)}]" if len(g.files) > 1 else "") for g in groups)


MEDMNIST = numbered("test", 624)
NNUNET_2 = [*numbered("prostate_00", 2), *numbered("prostate_01", 2)]
NNUNET_1 = ["la_003_0000.nii.gz", "la_004_0000.nii.gz"]
BRATS = [*numbered("BraTS_001", 4), *numbered("BraTS_002", 4)]
BIDS = ["sub-01_T1w.nii.gz", "sub-01_T2w.nii.gz", "sub-02_T1w.nii.gz", "sub-02_ses-2_T1w.nii.gz"]
DATED = ["scan_20240101_0001.nii.gz", "scan_20240101_0002.nii.gz", "scan_20240102_0001.nii.gz", "scan_2019.nrrd"]
DATED_FROM_ZERO = ["ct_20240101_0000.mha", "ct_20240101_0001.mha"]
FROM_ONE = [*numbered("scan", 3, start=1), "case_0042.nii.gz"]
SHORT_EXPORT = numbered("img", 4)  # 4 numbered scans or one 4-channel case? Only a model can say
MIXED = ["plain.nii.gz", "scan_2019.nii.gz", *numbered("a", 2), *numbered("b", 2), *numbered("test", 10)]
MISSING = [*numbered("a", 2), "b_0000.nii.gz"]
GAP = ["x_0000.nii.gz", "x_0002.nii.gz"]
TWO_FORMATS = ["y_0000.nii.gz", "y_0000.mha"]
LONG_RUNS = [*numbered("p", MAX_GUESSED_CHANNELS + 1), *numbered("q", MAX_GUESSED_CHANNELS + 1)]

CORPUS = [
    pytest.param(MEDMNIST, {1: each(MEDMNIST), 2: each(MEDMNIST), 4: each(MEDMNIST), None: each(MEDMNIST)},
                 id="medmnist-export-624"),
    pytest.param(NNUNET_2, {1: each(NNUNET_2), 2: ["prostate_00[2]", "prostate_01[2]"],
                            4: ["prostate_00!", "prostate_01!"], None: ["prostate_00[2]", "prostate_01[2]"]},
                 id="nnunet-2-channels"),
    pytest.param(NNUNET_1, {1: ["la_003", "la_004"], 2: ["la_003!", "la_004!"], 4: ["la_003!", "la_004!"],
                            None: ["la_003", "la_004"]}, id="nnunet-1-channel"),
    pytest.param(BRATS, {1: each(BRATS), 2: each(BRATS), 4: ["BraTS_001[4]", "BraTS_002[4]"],
                         None: ["BraTS_001[4]", "BraTS_002[4]"]}, id="brats-4-channels"),
    pytest.param(BIDS, {c: each(BIDS) for c in (1, 2, 4, None)}, id="bids"),
    pytest.param(DATED, {c: each(DATED) for c in (1, 2, 4, None)}, id="dates-and-series-numbers"),
    pytest.param(DATED_FROM_ZERO, {1: each(DATED_FROM_ZERO), 2: ["ct_20240101[2]"], 4: ["ct_20240101!"],
                                   None: each(DATED_FROM_ZERO)}, id="series-numbered-from-zero"),
    pytest.param(FROM_ONE, {c: each(FROM_ONE) for c in (1, 2, 4, None)}, id="numbered-from-one"),
    pytest.param(SHORT_EXPORT, {1: each(SHORT_EXPORT), 2: each(SHORT_EXPORT), 4: ["img[4]"],
                                None: each(SHORT_EXPORT)}, id="short-export"),
    pytest.param(MIXED, {1: each(MIXED), 2: ["a[2]", "b[2]", "plain", "scan_2019", *each(numbered("test", 10))],
                         4: ["a!", "b!", "plain", "scan_2019", *each(numbered("test", 10))], None: each(MIXED)},
                 id="mixed-folder"),
    pytest.param(MISSING, {1: ["a_0000", "a_0001", "b"], 2: ["a[2]", "b!"], 4: ["a!", "b!"],
                           None: ["a_0000", "a_0001", "b"]}, id="a-missing-channel"),
    pytest.param(GAP, {1: each(GAP), 2: ["x!"], 4: ["x!"], None: each(GAP)}, id="gap"),
    pytest.param(TWO_FORMATS, {c: each(TWO_FORMATS) for c in (1, 2, 4, None)}, id="one-name-two-formats"),
    pytest.param(LONG_RUNS, {c: each(LONG_RUNS) for c in (1, 2, 4, None)}, id="runs-longer-than-channels"),
]


@pytest.mark.parametrize("channels", [1, 2, 4, None])
@pytest.mark.parametrize(("names", "expected"), CORPUS)
def test_the_corpus_gives_its_cases(names: list[str], expected: dict[int | None, list[str]],
                                    channels: int | None) -> None:
    groups, notes = group_channel_files([Path("in") / n for n in names], channels)
    assert shown(groups) == sorted(expected[channels])
    assert sorted(p for g in groups for p in g.files) == sorted(Path("in") / n for n in names)  # each file once
    assert len(notes) <= 1 and all(len(note) < 700 for note in notes)  # one short note per folder


def test_channel_files_come_in_channel_order_whatever_the_listing_order() -> None:
    files = [Path("in") / n for n in ("c_0003.nii.gz", "c_0001.nii.gz", "c_0000.nii.gz", "c_0002.nii.gz")]
    ((group,), _) = group_channel_files(files, 4)
    assert group.channels and [p.name for p in group.files] == sorted(p.name for p in files)


def test_the_624_exports_get_one_short_note_without_a_model() -> None:
    _, notes = group_channel_files([Path("test") / n for n in MEDMNIST], None)
    (note,) = notes
    assert "test_0000.nii.gz … test_0623.nii.gz (624 files)" in note and "only one name (test)" in note
    assert "test_0001" not in note and "channel_names" in note  # the range, never the list; how to choose


def test_a_one_channel_model_reads_numbered_files_without_a_note() -> None:
    groups, notes = group_channel_files([Path("test") / n for n in MEDMNIST], 1)
    assert len(groups) == 624 and notes == []


def test_a_two_channel_model_notes_the_numbered_files_it_cannot_take_as_channels() -> None:
    _, notes = group_channel_files([Path("test") / n for n in MEDMNIST], 2)
    (note,) = notes
    assert "(624 files) are more than the 2 channel files X_0000 to X_0001" in note


def test_channel_files_given_to_a_one_channel_model_are_noted() -> None:
    _, notes = group_channel_files([Path("in") / n for n in BRATS], 1)
    (note,) = notes
    assert "named like the channel files of 4-channel cases, but the channel count is 1" in note


def test_missing_channels_are_named_and_long_lists_counted() -> None:
    (group,), _ = group_channel_files([Path("in/x_0000.nii.gz"), Path("in/x_0002.nii.gz")], 2)
    assert group.problem == (f"{Path('in/x')}: Expected 2 channel files x_0000 to x_0001. Got x_0000.nii.gz, "
                             "x_0002.nii.gz: channel(s) 0001 missing; x_0002 beyond the last channel. Add the "
                             "missing channel files, or renumber the channels from _0000 without gaps.")
    (group,), _ = group_channel_files([Path("in/x_0000.nii.gz")], 12)
    assert "channel(s) 0001, 0002, 0003, 0004, 0005 and 6 more missing" in (group.problem or "")


def test_each_folder_is_grouped_on_its_own() -> None:
    files = [Path("nnunet") / n for n in NNUNET_2] + [Path("export") / n for n in SHORT_EXPORT]
    groups, notes = group_channel_files(files, None)
    assert shown(groups) == sorted(["prostate_00[2]", "prostate_01[2]", *each(SHORT_EXPORT)])
    assert len(notes) == 1 and notes[0].startswith("export: ")


def test_a_channel_count_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="channels must be at least 1 or None"):
        group_channel_files([Path("a_0000.nii.gz")], 0)


# ------------------------------------------------------------------------- discovery on disk


def _touch(root: Path, names: list[str]) -> None:
    """Discovery goes by file names (formats by suffix), so empty files stand in for scans."""
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).touch()


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_a_dicom_series_with_numbered_slices_is_one_case_for_any_model(tmp_path: Path, channels: int) -> None:
    write_series(tmp_path / "ct", names="IM_{i:04d}.dcm")
    _touch(tmp_path, [f"mr/{n}" for n in NNUNET_2])
    found = discover(tmp_path, channels)
    ct = [c for c in found.cases if c.kind == "dicom_series"]
    assert [(c.case_id, c.path) for c in ct] == [("ct", tmp_path / "ct")] and ct[0].problem is None
    mr = sorted(c.case_id for c in found.cases if c.kind == "file")
    assert mr == (["mr__prostate_00", "mr__prostate_01"] if channels != 1 else [f"mr__{n}" for n in each(NNUNET_2)])


def test_discovery_names_cases_and_keeps_notes(tmp_path: Path) -> None:
    _touch(tmp_path, [f"test/{n}" for n in MEDMNIST[:30]] + ["test/scan_0000.nii.gz"])
    found = discover(tmp_path, 1)
    assert [c.case_id for c in found.cases] == sorted([f"test__test_{i:04d}" for i in range(30)] + ["test__scan"])
    assert all(c.problem is None and c.channels == () for c in found.cases if c.case_id != "test__scan")
    found = discover(tmp_path, 2)
    assert len(found.notes) == 1 and "(30 files) are more than the 2 channel files" in found.notes[0]
    assert "scan_0000" in next(c.problem or "" for c in found.cases if c.case_id == "test__scan")


def test_one_name_in_two_formats_is_refused_as_a_shared_case_id(tmp_path: Path) -> None:
    _touch(tmp_path, TWO_FORMATS)
    cases = discover(tmp_path, 1).cases
    assert [c.case_id for c in cases] == ["y_0000", "y_0000"] and all("is shared by" in (c.problem or "")
                                                                       for c in cases)


# ------------------------------------------------------------------------- manifest and layouts


def _nnunet(root: Path, names: list[str], channel_names: dict[str, str] | None = None) -> Path:
    _touch(root / "imagesTr", names)
    if channel_names is not None:
        (root / "dataset.json").write_text(json.dumps({"channel_names": channel_names, "labels": {"background": 0}}))
    return root


def test_dataset_json_channel_names_decide_the_grouping(tmp_path: Path) -> None:
    root = _nnunet(tmp_path, SHORT_EXPORT, {"0": "T1", "1": "T2", "2": "FLAIR", "3": "T1c"})
    (case,) = detect_layout(root).cases
    assert case.case_id == "img" and case.images == tuple(f"imagesTr/{n}" for n in SHORT_EXPORT)


def test_without_dataset_json_a_numbered_run_is_one_case_per_file_with_a_note(tmp_path: Path) -> None:
    layout = detect_layout(_nnunet(tmp_path, MEDMNIST[:40]))
    assert len(layout.cases) == 40 and all(len(c.images) == 1 for c in layout.cases)
    assert "test_0000.nii.gz … test_0039.nii.gz (40 files) are read one case each" in layout.describe()


def test_without_dataset_json_agreeing_cases_are_grouped(tmp_path: Path) -> None:
    layout = detect_layout(_nnunet(tmp_path, BRATS))
    assert [(c.case_id, len(c.images)) for c in layout.cases] == [("BraTS_001", 4), ("BraTS_002", 4)]
    assert not any("numbered" in note for note in layout.notes)  # only the missing labels are noted


def test_manifest_build_refuses_cases_missing_channels_that_dataset_json_names(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "ds", MISSING, {"0": "T1", "1": "T2"})
    with pytest.raises(ManifestError, match=r"imagesTr: 1 case\(s\) with missing channel files\. .*b: Expected 2 "
                                            r"channel files b_0000 to b_0001\. Got b_0000\.nii\.gz"):
        build_manifest(root, tmp_path / "m.csv")


def test_manifest_build_refuses_a_file_and_channel_files_of_one_name(tmp_path: Path) -> None:
    root = _nnunet(tmp_path / "ds", ["x.nii.gz", "x_0000.nii.gz"])
    with pytest.raises(ManifestError, match=r"both name case 'x'\. Rename or remove one of them"):
        build_manifest(root, tmp_path / "m.csv")
