"""`medseg evaluate`: a predictions folder scored against references with the runs' own metrics."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.api import parse_label_names
from medseg.errors import UsageError
from medseg.tasks.segmentation.folder_scores import score_folders
from medseg.tasks.segmentation.metrics import SegmentationMetrics
from tests.conftest import make_case

LABELS = {1: "anterior", 2: "posterior"}
SPACING = (0.9, 1.1, 2.3)


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array.astype(np.uint8), affine), str(path))
    return path


def _shifted(label: np.ndarray, seed: int) -> np.ndarray:
    """A prediction that is the reference moved by one voxel and with a few voxels relabelled."""
    rng = np.random.default_rng(seed)
    pred = np.roll(label, 1, axis=0)
    flips = rng.random(label.shape) < 0.01
    pred[flips] = rng.integers(0, 3, int(flips.sum()))
    return pred


@pytest.fixture()
def folders(tmp_path: Path) -> tuple[Path, Path, dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]]:
    cases = {}
    for i, shape in enumerate([(29, 37, 23), (31, 19, 17), (23, 29, 13)]):
        _, label, affine = make_case(shape, seed=i, spacing=SPACING)
        pred = _shifted(label, i)
        case_id = f"hippocampus_{i:03d}"
        _write(tmp_path / "labelsTs" / f"{case_id}.nii.gz", label, affine)
        _write(tmp_path / "pred" / f"{case_id}.nii.gz", pred, affine)
        cases[case_id] = (pred, label, affine)
    # what `medseg predict` writes beside a mask: not a prediction to pair
    _write(tmp_path / "pred" / "hippocampus_000_entropy.nii.gz", np.zeros((29, 37, 23)), cases["hippocampus_000"][2])
    return tmp_path / "pred", tmp_path / "labelsTs", cases


def test_scores_equal_the_runs_metric_code(folders, tmp_path: Path) -> None:
    pred_dir, ref_dir, cases = folders
    scores = score_folders(pred_dir, ref_dir, LABELS, out=tmp_path / "scores")
    expected = SegmentationMetrics({0: "background", **LABELS}, hd95=False)
    for case_id, (pred, label, _) in cases.items():
        expected.update(torch.from_numpy(pred.astype(np.int64)), torch.from_numpy(label.astype(np.int64)),
                        case_id=case_id)
    run_style = expected.aggregate("test")
    assert scores.scored == 3 and not scores.failed and scores.unpaired == []
    assert scores.dice["anterior"] == pytest.approx(run_style["test/dice/anterior"])
    assert scores.dice["dice_mean"] == pytest.approx(run_style["test/dice_mean"])
    rows = list(csv.DictReader((tmp_path / "scores" / "scores.csv").open()))
    assert len(rows) == 3 * 2 and {r["label"] for r in rows} == {"anterior", "posterior"}
    summary = json.loads((tmp_path / "scores" / "scores.json").read_text())
    assert summary["cases_scored"] == 3


def test_volumes_are_in_millilitres_of_the_reference_grid(folders) -> None:
    pred_dir, ref_dir, cases = folders
    scores = score_folders(pred_dir, ref_dir, LABELS)
    pred, label, _ = cases["hippocampus_001"]
    voxel_ml = float(np.prod(SPACING)) / 1000
    row = next(r for r in scores.rows if r["case_id"] == "hippocampus_001" and r["label"] == "posterior")
    assert row["volume_ref_ml"] == pytest.approx((label == 2).sum() * voxel_ml, rel=1e-4)
    assert row["volume_error_ml"] == pytest.approx(((pred == 2).sum() - (label == 2).sum()) * voxel_ml, rel=1e-4)
    assert row["hd95_mm"] > 0


def test_labels_found_in_the_references_when_not_given(folders) -> None:
    pred_dir, ref_dir, _ = folders
    assert score_folders(pred_dir, ref_dir).labels == {1: "label_1", 2: "label_2"}


def test_a_bad_case_is_a_failed_row_and_the_others_are_scored(folders) -> None:
    pred_dir, ref_dir, cases = folders
    pred, label, affine = cases["hippocampus_002"]
    moved = affine.copy()
    moved[:3, 3] += 5.0
    _write(pred_dir / "hippocampus_002.nii.gz", pred, moved)  # right shape, wrong origin
    (pred_dir / "hippocampus_001.nii.gz").unlink()
    _write(pred_dir / "extra_case.nii.gz", pred, affine)
    scores = score_folders(pred_dir, ref_dir, LABELS)
    assert scores.scored == 1
    assert "affine" in scores.failed["hippocampus_002"] and "resample" in scores.failed["hippocampus_002"]
    assert "no prediction named hippocampus_001" in scores.failed["hippocampus_001"]
    assert scores.unpaired == ["extra_case"]


def test_probabilities_are_refused_with_the_reason(folders) -> None:
    pred_dir, ref_dir, cases = folders
    _, label, affine = cases["hippocampus_000"]
    nib.save(nib.Nifti1Image(label.astype(np.float32) * 0.4, affine), str(pred_dir / "hippocampus_000.nii.gz"))
    assert "probability map" in score_folders(pred_dir, ref_dir, LABELS).failed["hippocampus_000"]


def test_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        score_folders(tmp_path / "nope", tmp_path)


def test_cli_prints_the_mean_table_and_writes_files(folders, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: a subprocess spent ~25 s importing medseg again; `python -m medseg` as an entry point
    # is run by tests/tasks/classification/test_end_to_end.py and tests/engine/test_distributed.py
    from medseg.cli import EXIT_OK, main

    pred_dir, ref_dir, _ = folders
    out = tmp_path / "cli_scores"
    code = main(["evaluate", str(pred_dir), str(ref_dir), "--labels", "1=anterior,2=posterior", "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == EXIT_OK, printed[-2000:]
    assert "| anterior |" in printed and "3 cases scored" in printed
    assert (out / "scores.csv").is_file() and (out / "scores.json").is_file()


@pytest.mark.parametrize("spec", ["1", "a=x", "1=", "1=a,1=b", " , "])
def test_a_bad_label_spec_is_a_usage_error_that_shows_the_form(spec: str) -> None:
    with pytest.raises(UsageError, match=r"--labels .*(value=name|named twice|no labels)"):
        parse_label_names(spec)


def test_label_spec_names_values() -> None:
    assert parse_label_names("1=anterior, 2=posterior") == {1: "anterior", 2: "posterior"}


def test_the_python_api_takes_the_cli_label_form(folders) -> None:
    import medseg

    pred_dir, ref_dir, _ = folders
    scores = medseg.evaluate(pred_dir, ref_dir, labels="1=anterior,2=posterior")
    assert list(scores.labels.values()) == ["anterior", "posterior"] and scores.scored == 3
