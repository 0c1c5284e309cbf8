"""``verify_manifest``: each broken property of a small synthetic MSD dataset is reported as exactly
one check naming the case, the file and Expected/Got; plus the JSON report and ``medseg verify``."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, replace
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.data.build import build_manifest
from medseg.data.manifest import Case, Manifest, read_manifest, sha256_of, write_manifest
from medseg.data.verify import Finding, VerifyReport, verify_manifest
from tests.conftest import oblique_affine, write_msd_dataset

SHAPE = (15, 17, 9)
LABELS = (0, 1, 2)
SPLIT_ARGS = {"seed": 0, "val_fraction": 0.25}


@dataclass
class Data:
    """A synthetic MSD dataset, its manifest and the ids of one train and one val case."""

    root: Path
    manifest_path: Path
    train_id: str
    val_id: str

    def manifest(self) -> Manifest:
        return read_manifest(self.manifest_path)

    def case(self, case_id: str) -> Case:
        return next(c for c in self.manifest().cases if c.case_id == case_id)

    def image(self, case_id: str) -> Path:
        return self.root / self.case(case_id).images[0]

    def label(self, case_id: str) -> Path:
        path = self.case(case_id).label
        assert path is not None
        return self.root / path

    def rebuild(self) -> None:
        """Rebuild the manifest (same seed, so the same splits) so hashes match the broken files."""
        build_manifest(self.root, self.manifest_path, **SPLIT_ARGS)

    def edit(self, case_id: str, **changes: object) -> None:
        """Rewrite one manifest row."""
        cases = [replace(c, **changes) if c.case_id == case_id else c for c in self.manifest().cases]
        write_manifest(cases, self.manifest_path)

    def verify(self, check_hashes: bool = True) -> VerifyReport:
        return verify_manifest(self.manifest_path, self.root, LABELS, check_hashes=check_hashes,
                               progress=False, workers=1)


@pytest.fixture
def data(tmp_path: Path) -> Data:
    root = write_msd_dataset(tmp_path / "ds", n_cases=4, shape=SHAPE)
    manifest = build_manifest(root, tmp_path / "manifest.csv", **SPLIT_ARGS)
    train = manifest.split("train")[0].case_id
    val = manifest.split("val")[0].case_id
    return Data(root, tmp_path / "manifest.csv", train, val)


def _rewrite(path: Path, array: np.ndarray | None = None, affine: np.ndarray | None = None) -> None:
    """Re-save a NIfTI with a new array and/or affine, keeping the rest of the header."""
    img = nib.load(path)
    new_array = np.asarray(img.dataobj) if array is None else array
    header = img.header.copy()
    header.set_data_dtype(new_array.dtype)
    nib.save(nib.Nifti1Image(new_array, img.affine if affine is None else affine, header), path)


def _array(path: Path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj).copy()


def _only(report: VerifyReport, check: str, severity: str = "error") -> Finding:
    """The report holds exactly one finding, of ``check`` and ``severity``."""
    assert [(f.severity, f.check) for f in report.findings] == [(severity, check)], report.summary()
    return report.findings[0]


# ------------------------------------------------------------------------------------ per-case checks


def test_clean_dataset_has_no_findings(data: Data) -> None:
    report = data.verify()
    assert report.ok and report.findings == []
    assert report.n_cases == 4
    assert report.manifest_sha256 == sha256_of(data.manifest_path)


def test_missing_image_file(data: Data) -> None:
    image = data.image(data.train_id)
    image.unlink()
    report = data.verify()
    finding = _only(report, "missing_file")
    assert not report.ok
    assert finding.case_id == data.train_id
    assert finding.files == [str(image)]
    assert (finding.expected, finding.got) == ("file exists", "not found")


def test_missing_label_for_a_train_case(data: Data) -> None:
    data.edit(data.train_id, label=None, label_sha256=None)
    report = data.verify()
    finding = _only(report, "missing_label")
    assert not report.ok
    assert finding.case_id == data.train_id
    assert finding.files == [str(data.image(data.train_id))]
    assert finding.got == "empty label column"
    assert "'train'" in finding.message


def test_missing_label_is_fine_for_a_test_case(data: Data) -> None:
    data.edit(data.train_id, label=None, label_sha256=None, split="test")
    assert data.verify().findings == []


def test_file_changed_after_the_manifest_was_built(data: Data) -> None:
    image = data.image(data.val_id)
    recorded = data.case(data.val_id).image_sha256[0]
    array = _array(image)
    array[0, 0, 0] += 1.0
    _rewrite(image, array)
    report = data.verify()
    finding = _only(report, "hash_mismatch")
    assert not report.ok
    assert finding.case_id == data.val_id and finding.files == [str(image)]
    assert finding.expected == f"sha256 {recorded}"
    assert finding.got == f"sha256 {sha256_of(image)}" and recorded not in finding.got
    assert "medseg manifest build" in finding.message


def test_changed_label_is_a_hash_mismatch_too(data: Data) -> None:
    label = data.label(data.train_id)
    array = _array(label)
    array[array == 2] = 1
    _rewrite(label, array)
    finding = _only(data.verify(), "hash_mismatch")
    assert finding.files == [str(label)]


def test_truncated_nifti_is_unreadable(data: Data) -> None:
    image = data.image(data.train_id)
    payload = image.read_bytes()
    image.write_bytes(payload[: len(payload) // 2])
    data.rebuild()
    report = data.verify()
    finding = _only(report, "unreadable")
    assert not report.ok
    assert finding.case_id == data.train_id and finding.files == [str(image)]
    assert finding.expected == "a readable image"
    assert str(image) in finding.message and "truncated" in finding.message


def test_not_a_nifti_at_all_is_unreadable(data: Data) -> None:
    label = data.label(data.val_id)
    label.write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    data.rebuild()
    finding = _only(data.verify(), "unreadable")
    assert finding.files == [str(label)] and finding.expected == "a readable label"


def test_nan_in_image(data: Data) -> None:
    image = data.image(data.train_id)
    array = _array(image)
    array[3, 4, 5] = np.nan
    array[1, 1, 1] = np.inf
    _rewrite(image, array)
    data.rebuild()
    report = data.verify()
    finding = _only(report, "non_finite")
    assert not report.ok
    assert finding.case_id == data.train_id and finding.files == [str(image)]
    assert finding.expected == "finite intensities"
    assert finding.got == "2 NaN/Inf voxel(s)"


def test_label_shape_differs(data: Data) -> None:
    label = data.label(data.train_id)
    _rewrite(label, _array(label)[:, :-2, :])
    data.rebuild()
    finding = _only(data.verify(), "label_shape_mismatch")
    assert finding.case_id == data.train_id
    assert finding.files == [str(data.image(data.train_id)), str(label)]
    assert finding.expected == f"shape {SHAPE}"
    assert finding.got == f"shape {(SHAPE[0], SHAPE[1] - 2, SHAPE[2])}"


def _broken_affine(affine: np.ndarray, what: str) -> np.ndarray:
    """``affine`` with only its spacing, origin or direction changed."""
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    if what == "spacing":
        return oblique_affine((spacing[0], spacing[1], 2.7), tuple(affine[:3, 3]))
    if what == "origin":
        out = affine.copy()
        out[:3, 3] += (0.0, 4.5, 0.0)
        return out
    return oblique_affine(tuple(spacing), tuple(affine[:3, 3]), angle_deg=-30.0)


@pytest.mark.parametrize(
    ("what", "expected", "got"),
    [
        ("spacing", "spacing (0.9, 1.1, 2.3)", "spacing (0.9, 1.1, 2.7)"),
        ("origin", "origin ({x}, -12.5, 7.25)", "origin ({x}, -8, 7.25)"),
        ("direction", "direction (0.9563, -0.2924, 0, 0.2924, 0.9563, 0, 0, 0, 1)",
         "direction (0.866, 0.5, 0, -0.5, 0.866, 0, 0, 0, 1)"),
    ],
    ids=["spacing", "origin", "direction"],
)
def test_label_geometry_differs(data: Data, what: str, expected: str, got: str) -> None:
    label = data.label(data.val_id)
    image_affine = nib.load(data.image(data.val_id)).affine
    _rewrite(label, affine=_broken_affine(image_affine, what))
    data.rebuild()
    report = data.verify()
    finding = _only(report, "label_geometry_mismatch")
    assert not report.ok
    assert finding.case_id == data.val_id
    assert finding.files == [str(data.image(data.val_id)), str(label)]
    x = f"{image_affine[0, 3]:.4g}"
    assert (finding.expected, finding.got) == (expected.format(x=x), got.format(x=x))
    assert f"{what} differs between" in finding.message


def test_tiny_geometry_noise_is_tolerated(data: Data) -> None:
    label = data.label(data.train_id)
    affine = nib.load(label).affine.copy()
    affine[:3, 3] += 1e-4
    _rewrite(label, affine=affine)
    data.rebuild()
    assert data.verify().findings == []


def test_label_value_outside_the_label_map(data: Data) -> None:
    label = data.label(data.train_id)
    array = _array(label)
    array[0, 0, 0] = 5
    _rewrite(label, array)
    data.rebuild()
    report = data.verify()
    finding = _only(report, "label_values")
    assert not report.ok
    assert finding.case_id == data.train_id and finding.files == [str(label)]
    assert finding.expected == "values in [0, 1, 2] (data.labels)"
    assert finding.got == "values [0, 1, 2, 5]"
    assert "[5]" in finding.message


def test_float_label_with_fractional_values(data: Data) -> None:
    label = data.label(data.train_id)
    array = _array(label).astype(np.float32)
    array[array == 2] = 0.5
    _rewrite(label, array)
    data.rebuild()
    report = data.verify()
    finding = _only(report, "label_not_integer")
    assert not report.ok
    assert finding.case_id == data.train_id and finding.files == [str(label)]
    assert finding.expected == "integer label values"
    assert "0.5" in finding.got


def test_float_label_with_integer_values_is_fine(data: Data) -> None:
    label = data.label(data.train_id)
    _rewrite(label, _array(label).astype(np.float32))
    data.rebuild()
    assert data.verify().findings == []


def test_empty_label_is_only_a_warning(data: Data) -> None:
    label = data.label(data.val_id)
    _rewrite(label, np.zeros_like(_array(label)))
    data.rebuild()
    report = data.verify()
    finding = _only(report, "empty_label", severity="warning")
    assert report.ok and report.errors == [] and report.warnings == [finding]
    assert finding.case_id == data.val_id and finding.files == [str(label)]
    assert finding.got == "only background"


# ------------------------------------------------------------------------------------ channels


def _add_second_channel(data: Data, case_id: str, broken: str) -> Path:
    """Give ``case_id`` a second channel whose shape or spacing differs from the first."""
    first = data.image(case_id)
    img = nib.load(first)
    array = np.asarray(img.dataobj)
    if broken == "shape":
        array, affine = array[:-1], img.affine
    else:
        affine = _broken_affine(img.affine, "spacing")
    second = first.with_name(first.name.replace(".nii.gz", "_t2.nii.gz"))
    nib.save(nib.Nifti1Image(array, affine, img.header.copy()), second)
    case = data.case(case_id)
    data.edit(case_id, images=(*case.images, second.relative_to(data.root).as_posix()),
              image_sha256=(*case.image_sha256, sha256_of(second)))
    return second


@pytest.mark.parametrize(("broken", "check", "got_part"), [
    ("shape", "channel_shape_mismatch", f"shape {(SHAPE[0] - 1, SHAPE[1], SHAPE[2])}"),
    ("spacing", "channel_geometry_mismatch", "spacing (0.9, 1.1, 2.7)"),
], ids=["shape", "spacing"])
def test_channels_on_different_grids(data: Data, broken: str, check: str, got_part: str) -> None:
    second = _add_second_channel(data, data.train_id, broken)
    report = data.verify()
    finding = _only(report, check)
    assert not report.ok
    assert finding.case_id == data.train_id
    assert finding.files == [str(data.image(data.train_id)), str(second)]
    assert finding.got == got_part


def test_channels_on_the_same_grid_are_fine(data: Data) -> None:
    first = data.image(data.val_id)
    second = first.with_name("second_channel.nii.gz")
    img = nib.load(first)
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * 2.0, img.affine, img.header.copy()), second)
    case = data.case(data.val_id)
    data.edit(data.val_id, images=(*case.images, second.relative_to(data.root).as_posix()),
              image_sha256=(*case.image_sha256, sha256_of(second)))
    assert data.verify().findings == []


# ------------------------------------------------------------------------------------ leakage


def test_same_image_file_in_train_and_val(data: Data) -> None:
    train = data.case(data.train_id)
    data.edit(data.val_id, images=train.images, image_sha256=train.image_sha256,
              label=train.label, label_sha256=train.label_sha256)
    report = data.verify()
    finding = _only(report, "leak_duplicate_file")
    assert not report.ok
    assert finding.case_id in {data.train_id, data.val_id}
    assert finding.files == [train.images[0], train.images[0]]
    assert "['train', 'val']" in finding.got
    assert data.train_id in finding.got and data.val_id in finding.got


def test_same_image_file_twice_in_one_split_is_a_warning(data: Data) -> None:
    first, second = (c.case_id for c in data.manifest().split("train")[:2])
    other = data.case(first)
    data.edit(second, images=other.images, image_sha256=other.image_sha256,
              label=other.label, label_sha256=other.label_sha256)
    report = data.verify()
    finding = _only(report, "duplicate_file", severity="warning")
    assert report.ok
    assert first in finding.got and second in finding.got


def test_same_subject_in_train_and_val(data: Data) -> None:
    data.edit(data.train_id, subject_id="patient7")
    data.edit(data.val_id, subject_id="patient7")
    report = data.verify()
    finding = _only(report, "leak_subject")
    assert not report.ok
    assert finding.case_id in {data.train_id, data.val_id}
    assert finding.expected == "subject patient7 in one split"
    assert "['train', 'val']" in finding.got
    assert data.train_id in finding.got and data.val_id in finding.got


def test_same_subject_in_two_folds(data: Data) -> None:
    build_manifest(data.root, data.manifest_path, seed=0, folds=2)
    by_fold = {c.fold: c.case_id for c in data.manifest().cases}
    for case_id in by_fold.values():
        data.edit(case_id, subject_id="patient7")
    finding = _only(data.verify(), "leak_subject")
    assert "['fold 0', 'fold 1']" in finding.got


# ------------------------------------------------------------------------------------ report


def test_finding_str_shows_expected_got_and_files(data: Data) -> None:
    label = data.label(data.train_id)
    array = _array(label)
    array[0, 0, 0] = 5
    _rewrite(label, array)
    data.rebuild()
    text = str(_only(data.verify(), "label_values"))
    assert text.startswith(f"[ERROR] label_values: case {data.train_id}:")
    assert "Expected: values in [0, 1, 2] (data.labels)" in text
    assert "Got:      values [0, 1, 2, 5]" in text
    assert f"Files:    {label}" in text
    assert str(label) in data.verify().summary()


def test_report_json_round_trip(data: Data, tmp_path: Path) -> None:
    label = data.label(data.val_id)
    _rewrite(label, np.zeros_like(_array(label)))
    data.rebuild()
    data.image(data.train_id).unlink()
    report = data.verify()
    path = report.write(tmp_path / "out" / "verify.json")
    parsed = json.loads(path.read_text())
    assert parsed["ok"] is False
    assert (parsed["n_errors"], parsed["n_warnings"], parsed["n_cases"]) == (1, 1, 4)
    assert parsed["manifest"] == str(data.manifest_path)
    assert {(f["check"], f["case_id"]) for f in parsed["findings"]} == {
        ("missing_file", data.train_id), ("empty_label", data.val_id)}
    for f in parsed["findings"]:
        assert set(f) == {"severity", "check", "case_id", "files", "expected", "got", "message"}


# ------------------------------------------------------------------------------------ CLI


def _cli_verify(data: Data, report: Path) -> int:
    return main(["verify", str(data.manifest_path), "--root", str(data.root), "--labels", "0,1,2",
                 "--report", str(report), "--no-progress"])


def test_cli_verify_clean_dataset_exits_0(data: Data, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "clean.json"
    assert _cli_verify(data, report) == 0
    assert json.loads(report.read_text())["ok"] is True
    assert "0 error(s), 0 warning(s)" in capsys.readouterr().out


def test_cli_verify_broken_dataset_exits_1(data: Data, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    label = data.label(data.train_id)
    array = _array(label)
    array[0, 0, 0] = 5
    _rewrite(label, array)
    data.rebuild()
    report = tmp_path / "broken.json"
    assert _cli_verify(data, report) == 1
    parsed = json.loads(report.read_text())
    assert parsed["n_errors"] == 1 and parsed["findings"][0]["check"] == "label_values"
    out = capsys.readouterr().out
    assert "label_values" in out and str(label) in out and f"report: {report}" in out


def test_cli_verify_bad_labels_argument_is_a_usage_error(data: Data, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["verify", str(data.manifest_path), "--root", str(data.root), "--labels", "0,one"])
    assert code == 2
    assert "--labels '0,one': expected comma-separated integers" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ regressions


def test_blank_image_hashes_are_not_compared_with_the_label_hash(data: Data) -> None:
    for case in data.manifest().cases:
        data.edit(case.case_id, image_sha256=())
    assert data.verify().findings == []


def test_same_image_file_in_two_folds_is_a_leak(data: Data) -> None:
    build_manifest(data.root, data.manifest_path, seed=0, folds=2)
    cases = data.manifest().cases
    first = next(c for c in cases if c.fold == 0)
    second = next(c for c in cases if c.fold == 1)
    data.edit(second.case_id, images=first.images, image_sha256=first.image_sha256,
              label=first.label, label_sha256=first.label_sha256)
    _only(data.verify(), "leak_duplicate_file")


def test_nan_in_label_is_reported_not_raised(data: Data) -> None:
    label = data.label(data.train_id)
    array = _array(label).astype(np.float32)
    array[0, 0, 0] = np.nan
    _rewrite(label, array)
    data.rebuild()
    finding = _only(data.verify(), "non_finite")
    assert finding.files == [str(label)]


def test_channel_count_and_dimensions_are_checked_against_the_config(data: Data) -> None:
    report = verify_manifest(data.manifest_path, data.root, LABELS, progress=False, workers=1,
                             expected_channels=2, spatial_dims=3)
    assert {f.check for f in report.findings} == {"channel_count"}
    finding = report.findings[0]
    assert finding.expected == "2 channel(s) (data.channels)" and finding.got == "1 channel(s)"

    mid = SHAPE[2] // 2  # a slice through the blobs, so the label is not empty
    _rewrite(data.image(data.train_id), _array(data.image(data.train_id))[:, :, mid:mid + 1])
    _rewrite(data.label(data.train_id), _array(data.label(data.train_id))[:, :, mid:mid + 1])
    data.rebuild()
    report = verify_manifest(data.manifest_path, data.root, LABELS, progress=False, workers=1,
                             expected_channels=1, spatial_dims=3)
    finding = _only(report, "dimensions")
    assert finding.case_id == data.train_id and "2D" in finding.got


def test_a_constant_image_is_an_error_unless_allowed(data: Data) -> None:
    image = data.image(data.train_id)
    _rewrite(image, np.full(_array(image).shape, 12.0, np.float32))
    data.rebuild()
    finding = _only(data.verify(), "constant_image")
    assert finding.files == [str(image)] and finding.got == "every voxel is 12"
    assert "preprocess.allow_constant" in finding.message
    manifest = read_manifest(data.manifest_path)
    allowed = verify_manifest(manifest, data.root, LABELS, progress=False, workers=1, allow_constant=True)
    assert allowed.ok, allowed.summary()


@pytest.mark.parametrize("damage, says", [
    ("empty", "the file is empty (0 bytes)"),
    ("huge header", "which needs"),
])
def test_unreadable_images_say_what_was_found(data: Data, damage: str, says: str) -> None:
    """Regression: an empty file and a header claiming 2000³ float32 both read "applying transform <...>"."""
    image = data.image(data.train_id)
    if damage == "empty":
        image.write_bytes(b"")
    else:
        header = nib.Nifti1Header()
        header.set_data_shape((2000, 2000, 2000))
        header.set_data_dtype(np.float32)
        image.write_bytes(gzip.compress(header.binaryblock + bytes(4100)))
    data.rebuild()
    finding = _only(data.verify(), "unreadable")
    assert says in finding.message and "applying transform" not in finding.message, finding.message


def test_negative_label_values_are_outside_the_label_map(data: Data) -> None:
    label = data.label(data.train_id)
    array = _array(label).astype(np.int16)
    array[1, 2, 3] = -1
    _rewrite(label, array)
    data.rebuild()
    finding = _only(data.verify(), "label_values")
    assert finding.got == "values [-1, 0, 1, 2]" and "[-1]" in finding.message
