"""Regression end to end on synthetic volumes whose target is a known function of the image: a
blob's volume in mL, measured from its label map by ``write_structure_volumes``. One tiny run
trains, evaluates and packages; its metrics, per-case CSV and Bland-Altman plot are logged, its
contract carries the training split's normalisation, and predict gives back the evaluated values
(plus a prediction interval with TTA)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

import medseg
from medseg.data.manifest import Case, read_manifest, write_manifest
from medseg.data.targets import read_targets, write_structure_volumes
from tests.conftest import artifact_paths, oblique_affine, train_run

SPACING = (1.0, 1.25, 1.6)  # anisotropic, so a voxel is 2 mm³


def _write_blobs(root: Path, n: int = 16) -> list[Case]:
    """``n`` volumes of odd, differing shapes, each with one ellipsoid whose size varies."""
    rng = np.random.default_rng(7)
    cases = []
    for i in range(n):
        shape = (15 + i % 3, 13, 11 - i % 2)
        grid = np.stack(np.meshgrid(*[np.arange(s) - s / 2 for s in shape], indexing="ij"))
        radii = rng.uniform(2.0, 5.0, 3)
        blob = (((grid / radii[:, None, None, None]) ** 2).sum(0) <= 1).astype(np.uint8)
        image = (blob * 3.0 + rng.normal(0, 0.4, shape)).astype(np.float32)
        for folder, array in (("images", image), ("labels", blob)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, oblique_affine(SPACING, (-20.0 + i, 5.0, 11.0), 10 + 7 * i)), root / folder / f"blob{i:02d}.nii.gz")
        split = "train" if i < n - 6 else ("val" if i < n - 3 else "test")
        cases.append(Case(f"blob{i:02d}", (f"images/blob{i:02d}.nii.gz",), f"labels/blob{i:02d}.nii.gz", split))
    return cases


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("regression")
    root = tmp / "data"
    manifest = write_manifest(_write_blobs(root), tmp / "blobs.csv")
    volumes = write_structure_volumes(read_manifest(manifest), root, {1: "blob"}, tmp / "volumes.csv")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    config = tmp / "regression.yaml"
    config.write_text(yaml.safe_dump({
        "task": "regression", "seed": 0, "output_dir": str(tmp / "runs"),
        "data": {"manifest": str(manifest), "root": str(root), "channels": ["mri"],
                 "targets": {"file": str(volumes), "columns": ["blob_ml"], "units": "mL"}},
        "preprocess": {"intensity": {"mode": "zscore"}, "size": [16, 16, 12], "fit": "pad_or_crop"},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0]}],
        "model": {"name": "lenet", "spatial_dims": 3, "channels": [4]},
        "loss": {"name": "huber"},
        "optim": {"lr": 0.003},
        "train": {"max_epochs": 2, "batch_size": 4, "val_interval": 1, "num_threads": 1, "device": "cpu"},
        "tracking": {"uri": uri, "experiment": "regression"},
    }))
    return {"result": train_run(config), "uri": uri, "root": root, "manifest": manifest, "volumes": volumes,
            "tmp": tmp}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_run_logs_regression_metrics_per_case_rows_and_a_bland_altman_plot(trained: dict) -> None:
    result, client = trained["result"], MlflowClient(trained["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val/neg_nmae")] == [1, 2]
    for key in ("test/mae", "test/rmse", "test/r2", "test/pearson", "test/spearman", "test/bias", "test/loa",
                "test/mae/blob_ml", "best_val/mae", "best_val/neg_nmae"):
        assert key in run.data.metrics, key
    artifacts = artifact_paths(client, result.run_id)
    assert {"plots/bland_altman_test_blob_ml.png", "plots/bland_altman_val_blob_ml.png",
            "evaluation/test_cases.csv"} <= artifacts
    rows = _rows(result.run_dir / "evaluation" / "test_cases.csv")
    truth = read_targets(trained["volumes"], ["blob_ml"])
    assert [r["case_id"] for r in rows] == ["blob13", "blob14", "blob15"]
    for row in rows:  # the true value is the blob's volume in mL, back in its units after normalisation
        assert float(row["true_blob_ml"]) == pytest.approx(truth.values[row["case_id"]][0], rel=1e-5)
        assert float(row["error_blob_ml"]) == pytest.approx(float(row["predicted_blob_ml"]) - float(row["true_blob_ml"]),
                                                            abs=1e-4)
    mae = np.mean([abs(float(r["error_blob_ml"])) for r in rows])
    assert run.data.metrics["test/mae"] == pytest.approx(mae, rel=1e-4)


def test_the_contract_carries_the_training_normalisation_and_predict_undoes_it(trained: dict) -> None:
    result = trained["result"]
    contract = json.loads((result.run_dir / "contract.json").read_text())
    train_ids = [c.case_id for c in read_manifest(trained["manifest"]).split("train")]
    train_targets = read_targets(trained["volumes"], ["blob_ml"]).array(train_ids)[:, 0]
    targets = contract["targets"]
    assert contract["task"] == "regression" and contract["fit"] == "pad_or_crop"
    assert targets["columns"] == ["blob_ml"] and targets["normalisation"] == "zscore" and targets["units"] == "mL"
    assert targets["mean"][0] == pytest.approx(train_targets.mean()) and targets["std"][0] == pytest.approx(
        train_targets.std())

    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=trained["uri"])
    test_images = trained["tmp"] / "test_images"
    test_images.mkdir()
    for case_id in ("blob13", "blob14", "blob15"):
        (test_images / f"{case_id}.nii.gz").write_bytes((trained["root"] / "images" / f"{case_id}.nii.gz").read_bytes())
    batch = predictor.predict_folder(test_images, trained["tmp"] / "out", progress=False)
    predicted = {r["case_id"]: float(r["predicted_blob_ml"]) for r in _rows(batch.report)}
    evaluated = {r["case_id"]: float(r["predicted_blob_ml"]) for r in _rows(result.run_dir / "evaluation" / "test_cases.csv")}
    assert predicted == pytest.approx(evaluated, rel=1e-3)  # predict reads the contract, never guesses
    assert "blob_ml_low" not in _rows(batch.report)[0]  # one prediction per case: no spread to show

    with_tta = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=trained["uri"], tta=True)
    rows = _rows(with_tta.predict_folder(test_images, trained["tmp"] / "out_tta", progress=False).report)
    for row in rows:
        low, mid, high = (float(row[k]) for k in ("blob_ml_low", "predicted_blob_ml", "blob_ml_high"))
        assert low <= mid <= high and float(row["blob_ml_sd"]) >= 0
