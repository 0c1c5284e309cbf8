"""Judging enhanced images downstream: the pairs table's errors, Dice and PSNR/SSIM by known
answers (masks written by hand), and the API and CLI with a frozen segmentation model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.cli import main
from medseg.errors import UsageError
from medseg.tasks.segmentation.downstream import read_pairs, score_downstream, stage_by_case
from tests.conftest import make_case


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


def _table(path: Path, rows: list[dict[str, str]]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture
def cases(tmp_path: Path) -> Path:
    """Two oblique anisotropic cases (image, label) and, per kind, an image on the same grid:
    ``original`` (the reference itself) and ``offset`` (the reference + 0.25 everywhere)."""
    rows = []
    for i, case_id in enumerate(("case_a", "case_b")):
        image, label, affine = make_case((21, 18, 13), seed=i)
        _save(image, affine, tmp_path / "original" / f"{case_id}.nii.gz")
        _save(image + np.float32(0.25), affine, tmp_path / "offset" / f"{case_id}.nii.gz")
        _save(label, affine, tmp_path / "labels" / f"{case_id}.nii.gz")
        for kind in ("original", "offset"):
            rows.append({"case_id": case_id, "kind": kind, "image": f"{kind}/{case_id}.nii.gz",
                         "reference": f"original/{case_id}.nii.gz", "label": f"labels/{case_id}.nii.gz"})
    _table(tmp_path / "pairs.csv", rows)
    return tmp_path


def test_the_pairs_table_names_what_is_wrong_and_where(cases: Path) -> None:
    assert [(p.case_id, p.kind) for p in read_pairs(cases / "pairs.csv")][:2] == [("case_a", "original"),
                                                                                  ("case_a", "offset")]
    good = {"case_id": "case_a", "kind": "sr", "image": "original/case_a.nii.gz",
            "reference": "original/case_a.nii.gz", "label": "labels/case_a.nii.gz"}
    with pytest.raises(UsageError, match=r"expected columns .*Add \['label'\]"):
        read_pairs(_table(cases / "bad.csv", [{k: v for k, v in good.items() if k != "label"}]))
    with pytest.raises(UsageError, match=r"line 2: the reference cell is empty"):
        read_pairs(_table(cases / "bad.csv", [{**good, "reference": ""}]))
    with pytest.raises(UsageError, match=r"line 3: image .*missing.nii.gz: not found"):
        read_pairs(_table(cases / "bad.csv", [good, {**good, "kind": "x", "image": "missing.nii.gz"}]))
    with pytest.raises(UsageError, match=r"case 'case_a' has two rows of kind 'sr'"):
        read_pairs(_table(cases / "bad.csv", [good, good]))
    with pytest.raises(UsageError, match=r"case_id '../up': expected letters, digits"):
        read_pairs(_table(cases / "bad.csv", [{**good, "case_id": "../up"}]))
    with pytest.raises(UsageError, match=r"--pairs .*nothing.csv: file not found"):
        read_pairs(cases / "nothing.csv")


def test_dice_and_image_quality_by_known_answers(cases: Path, tmp_path: Path) -> None:
    pairs = read_pairs(cases / "pairs.csv")
    labels = {1: "blob1", 2: "blob2"}
    # "original": perfect masks; "offset": blob2 missed entirely, blob1 perfect
    masks = {"original": stage_by_case({p.case_id: p.label for p in pairs if p.kind == "original"},
                                       tmp_path / "masks_original")}
    for case_id in ("case_a", "case_b"):
        label = nib.load(cases / "labels" / f"{case_id}.nii.gz")
        missed = np.asarray(label.dataobj).copy()
        missed[missed == 2] = 0
        _save(missed, label.affine, tmp_path / "masks_offset" / f"{case_id}.nii.gz")
    masks["offset"] = tmp_path / "masks_offset"
    scores = score_downstream(pairs, masks, labels, tmp_path / "work", out=tmp_path / "out")
    assert all(r["status"] == "ok" for r in scores.rows)
    original, offset = scores.means["original"], scores.means["offset"]
    assert original["dice_mean"] == pytest.approx(1.0) and original["cases"] == 2
    assert offset["dice/blob1"] == pytest.approx(1.0) and offset["dice/blob2"] == pytest.approx(0.0)
    assert offset["dice_mean"] == pytest.approx(0.5)
    assert math.isinf(original["psnr"]) and original["ssim"] == pytest.approx(1.0)
    for row in (r for r in scores.rows if r["kind"] == "offset"):  # MSE = 0.25^2, data range = the reference's
        reference = np.asarray(nib.load(cases / "original" / f"{row['case_id']}.nii.gz").dataobj, dtype=np.float64)
        expected = 20 * math.log10(reference.max() - reference.min()) - 10 * math.log10(0.25 ** 2)
        assert row["psnr"] == pytest.approx(expected, abs=1e-3)
    written = json.loads((tmp_path / "out" / "downstream.json").read_text())
    assert written["means"]["original"]["psnr"] is None  # infinity as JSON null
    with open(tmp_path / "out" / "downstream.csv", newline="") as fh:
        assert len(list(csv.DictReader(fh))) == 4
    assert scores.metrics()["downstream/offset/dice_mean"] == pytest.approx(0.5)
    assert "downstream/original/psnr" not in scores.metrics()  # not finite: not logged


def test_an_image_off_its_references_grid_is_a_failed_row_that_says_so(cases: Path, tmp_path: Path) -> None:
    image = nib.load(cases / "offset" / "case_a.nii.gz")
    _save(np.asarray(image.dataobj)[:, :, :-1], image.affine, cases / "offset" / "case_a.nii.gz")
    pairs = [p for p in read_pairs(cases / "pairs.csv") if p.kind == "offset"]
    masks = {"offset": stage_by_case({p.case_id: p.label for p in pairs}, tmp_path / "masks")}
    rows = {r["case_id"]: r for r in score_downstream(pairs, masks, {1: "a", 2: "b"}, tmp_path / "work").rows}
    assert rows["case_b"]["status"] == "ok"
    assert rows["case_a"]["status"] == "failed" and "expected the grid of its reference" in rows["case_a"]["error"]


def test_the_api_and_the_cli_judge_each_kind_with_a_frozen_segmenter(cases: Path, tmp_path: Path,
                                                                     trained_segmentation: dict[str, str]) -> None:
    model, uri = trained_segmentation["model_uri"], trained_segmentation["tracking_uri"]
    scores = medseg.evaluate_downstream(model, cases / "pairs.csv", tmp_path / "api", tracking_uri=uri,
                                        experiment="downstream-tests", progress=False)
    assert set(scores.means) == {"original", "offset"} and all(r["status"] == "ok" for r in scores.rows)
    assert all(0.0 <= r["dice_mean"] <= 1.0 for r in scores.rows)
    assert sorted(p.name for p in (tmp_path / "api" / "masks" / "offset").glob("*.nii.gz")) == [
        "case_a.nii.gz", "case_b.nii.gz"]
    run = MlflowClient(uri).get_run(scores.run_id)
    assert run.data.metrics["downstream/offset/dice_mean"] == pytest.approx(scores.means["offset"]["dice_mean"])
    assert "downstream/offset/psnr" in run.data.metrics

    code = main(["evaluate-downstream", "--model", model, "--pairs", str(cases / "pairs.csv"), "-o",
                 str(tmp_path / "cli"), "--tracking-uri", uri, "--no-log", "--no-progress"])
    assert code == 0 and (tmp_path / "cli" / "downstream.csv").is_file()
    again = json.loads((tmp_path / "cli" / "downstream.json").read_text())["means"]
    assert again["offset"]["dice_mean"] == pytest.approx(scores.means["offset"]["dice_mean"])
