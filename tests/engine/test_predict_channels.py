"""``medseg predict`` on nnU-Net channel files (X_0000, X_0001), on numbered scans (issue #32) and
on 2D image files."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.cli import main
from medseg.engine.model_format import read_model_folder, write_model_folder
from medseg.tasks.registry import network_from_spec
from tests.conftest import make_case


@pytest.fixture(scope="module")
def two_channel_model(trained_segmentation: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny trained segmentation model's network rebuilt for two input channels (fresh weights:
    predictions only need to be well-formed)."""
    files = read_model_folder(Path(trained_segmentation["run_dir"]) / "model")
    spec = copy.deepcopy(files.network_spec)
    spec["config"]["data"]["channels"] = ["T1", "T2"]
    contract = {**files.contract, "in_channels": 2, "channel_names": ["T1", "T2"]}
    folder = tmp_path_factory.mktemp("two_channel") / "model"
    write_model_folder(folder, network_from_spec(spec), spec, contract)
    return folder


def _save(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def test_channel_files_are_predicted_as_one_two_channel_case(two_channel_model: Path, tmp_path: Path,
                                                             trained_segmentation: dict[str, str]) -> None:
    inputs = tmp_path / "in"
    for i, case in enumerate(("p1", "p2")):
        image, _, affine = make_case((19, 15, 11), seed=40 + i, spacing=(0.9, 1.4, 2.2))
        _save(inputs / f"{case}_0000.nii.gz", image, affine)
        _save(inputs / f"{case}_0001.nii.gz", image * 0.5 + 3, affine)
    _save(inputs / "gap_0000.nii.gz", image, affine)
    _save(inputs / "gap_0002.nii.gz", image, affine)
    for i in range(4):  # more numbered files than the model's channels: scans, one case each
        _save(inputs / "export" / f"test_{i:04d}.nii.gz", image, affine)
    out = tmp_path / "out"
    code = main(["predict", "--model", str(two_channel_model), "--input", str(inputs), "--output", str(out),
                 "--tracking-uri", trained_segmentation["tracking_uri"], "--no-progress"])
    assert code == 1  # the case with a gap failed; the others are done
    with open(out / "predictions.csv", newline="") as fh:
        rows = {row["case_id"]: row for row in csv.DictReader(fh)}
    assert rows["p1"]["status"] == rows["p2"]["status"] == "ok"
    assert rows["p1"]["input"] == f"{inputs / 'p1_0000.nii.gz'};{inputs / 'p1_0001.nii.gz'}"
    assert rows["gap"]["status"] == "failed" and "channel(s) 0001 missing" in rows["gap"]["error"]
    for i in range(4):
        row = rows[f"export__test_{i:04d}"]
        assert row["status"] == "failed" and "the model expects 2 channel(s) ['T1', 'T2'], got 1" in row["error"]
    (note,) = json.loads((out / "predict_summary.json").read_text())["discovery_notes"]
    assert "test_0000.nii.gz … test_0003.nii.gz (4 files) are more than the 2 channel files" in note
    mask = nib.load(out / "p1.nii.gz")
    assert mask.shape == (19, 15, 11)
    np.testing.assert_allclose(mask.affine, nib.load(inputs / "p1_0000.nii.gz").affine, atol=1e-5)


def test_numbered_scans_are_cases_of_their_own_for_a_one_channel_model(tmp_path: Path,
                                                                        trained_segmentation: dict[str, str]) -> None:
    """Issue #32: exports named test_0000, test_0001, ... were one case of as many channels."""
    inputs = tmp_path / "test"
    for i in range(5):
        image, _, affine = make_case((13, 11, 9), seed=60 + i, spacing=(1.1, 0.8, 2.0))
        _save(inputs / f"test_{i:04d}.nii.gz", image, affine)
    _save(inputs / "single_0000.nii.gz", image, affine)  # nnU-Net's name for a one-channel case
    out = tmp_path / "out"
    code = main(["predict", "--model", str(Path(trained_segmentation["run_dir"]) / "model"), "--input", str(inputs),
                 "--output", str(out), "--tracking-uri", trained_segmentation["tracking_uri"], "--no-progress"])
    with open(out / "predictions.csv", newline="") as fh:
        rows = {row["case_id"]: row for row in csv.DictReader(fh)}
    assert code == 0, [row["error"] for row in rows.values() if row["error"]]
    assert sorted(rows) == ["single", *(f"test_{i:04d}" for i in range(5))]
    assert rows["test_0003"]["input"] == str(inputs / "test_0003.nii.gz")
    assert json.loads((out / "predict_summary.json").read_text())["discovery_notes"] == []


@pytest.fixture(scope="module")
def two_d_model(trained_segmentation: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny segmentation network rebuilt as a 2D U-Net (fresh weights) with a 2D contract."""
    files = read_model_folder(Path(trained_segmentation["run_dir"]) / "model")
    spec = copy.deepcopy(files.network_spec)
    spec["config"]["model"]["spatial_dims"] = 2
    spec["config"]["patch"]["size"] = [16, 16]
    spec["config"]["preprocess"].update(orientation="RA", spacing=None)
    contract = {**files.contract, "spatial_dims": 2, "patch_size": [16, 16], "orientation": "RA", "spacing": None,
                "tta_axes": [], "label_volumes_ml": None, "qc": {}}
    contract["model"] = {**contract["model"], "spatial_dims": 2}
    folder = tmp_path_factory.mktemp("two_d") / "model"
    write_model_folder(folder, network_from_spec(spec), spec, contract)
    return folder


def test_a_png_is_segmented_and_the_mask_written_on_its_grid(two_d_model: Path, tmp_path: Path,
                                                             trained_segmentation: dict[str, str]) -> None:
    from PIL import Image

    inputs = tmp_path / "in"
    inputs.mkdir()
    pixels = np.random.default_rng(3).integers(0, 256, size=(23, 31), dtype=np.uint8)
    Image.fromarray(pixels).save(inputs / "photo.png")
    out = tmp_path / "out"
    code = main(["predict", "--model", str(two_d_model), "--input", str(inputs), "--output", str(out),
                 "--tracking-uri", trained_segmentation["tracking_uri"], "--no-progress"])
    with open(out / "predictions.csv", newline="") as fh:
        (row,) = list(csv.DictReader(fh))
    assert code == 0, row["error"]
    mask = nib.load(out / "photo.nii.gz")
    assert mask.shape[:2] == (31, 23)  # (x = column, y = row), like the image's MetaTensor
    np.testing.assert_allclose(mask.affine, np.eye(4))
