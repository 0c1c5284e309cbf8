"""Classification end to end on an imported MedMNIST-layout file: MLflow metrics and figures,
selection by validation AUC, predict on a folder, fine-tuning from the logged model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from sklearn.metrics import roc_auc_score

import medseg
from medseg.cli import EXIT_FAILED, main
from medseg.data.medmnist import import_medmnist
from medseg.engine.checkpoint import load_checkpoint
from medseg.errors import UsageError
from tests.conftest import artifact_paths, classification_config, train_run, write_medmnist_npz


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def imported(tmp_path: Path) -> tuple[Path, Path]:
    npz = write_medmnist_npz(tmp_path / "toymnist.npz", counts=(32, 12, 12))
    import_medmnist(npz, tmp_path / "manifest.csv", tmp_path / "images", labels={0: "normal", 1: "lesion"},
                    progress=False)
    return tmp_path / "manifest.csv", tmp_path / "images"


def test_run_logs_metrics_figures_and_selects_by_val_auc(tmp_path: Path, imported, capsys) -> None:
    manifest, images = imported
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = classification_config(tmp_path, manifest, images, uri)
    result = train_run(config)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    auc_history = sorted(client.get_metric_history(run.info.run_id, "val/auc"), key=lambda m: m.step)
    assert [m.step for m in auc_history] == [1, 2, 3]
    for key in ("val/acc", "val/f1", "val/sensitivity", "val/specificity", "val/ece", "val/recall/lesion",
                "test/auc", "test/acc", "test/f1", "best_val/auc"):
        assert key in run.data.metrics, key
    artifacts = artifact_paths(client, run.info.run_id)
    for name in ("roc_test.png", "confusion_test.png", "calibration_test.png", "tsne_test.png", "roc_val.png",
                 "learning_curve.png"):
        assert f"plots/{name}" in artifacts, name
    assert "evaluation/test_cases.csv" in artifacts and str(result.model_uri).startswith("models:/")
    # Temperature scaling: fitted on val, stored in the contract; the AUC of two classes does not move.
    contract = json.loads((result.run_dir / "contract.json").read_text())
    temperature = contract["calibration"]["temperature"]
    assert temperature == run.data.metrics["calibration/temperature"] and contract["calibration"]["fitted_on"] == "val"
    assert {"test/ece", "test/ece_uncalibrated", "test/nll", "best_val/ece"} <= set(run.data.metrics)
    if temperature != 1.0:
        assert run.data.metrics["test/auc_uncalibrated"] == pytest.approx(run.data.metrics["test/auc"], abs=1e-9)

    # The checkpoint with the best validation AUC is the one evaluated, not the last epoch.
    run_dir = result.run_dir
    best = load_checkpoint(run_dir / "checkpoints" / "best.safetensors")
    values = [m.value for m in auc_history]
    assert best["epoch"] == 1 + int(np.argmax(values))
    assert best["val/auc"] == pytest.approx(max(values))
    assert run.data.metrics["best_val/auc"] == pytest.approx(max(values), abs=1e-6)
    # The test metrics are those of the per-case CSV's probabilities.
    rows = _rows(run_dir / "evaluation" / "test_cases.csv")
    assert len(rows) == 12 and set(rows[0]) == {"case_id", "label", "predicted", "prob_normal", "prob_lesion"}
    labels = [int(r["label"]) for r in rows]
    assert run.data.metrics["test/auc"] == pytest.approx(roc_auc_score(labels, [float(r["prob_lesion"]) for r in rows]),
                                                          abs=1e-5)
    assert result.metrics["test/auc"] > 0.8  # the toy task is learnable: a bright square's size

    # predict on the folder of test images gives the evaluation's probabilities, one row each.
    out = tmp_path / "predicted"
    predictor = medseg.Predictor.from_uri(result.model_uri, tracking_uri=uri)
    batch = predictor.predict_folder(images / "test", out, progress=False)
    predicted = {r.case_id: r for r in batch.results}
    assert len(predicted) == 12 and batch.counts["ok"] == 12 and batch.n_failed == 0
    for row in rows:
        values = predicted[row["case_id"]].values
        assert float(values["prob_lesion"]) == pytest.approx(float(row["prob_lesion"]), abs=1e-5)
        assert str(values["predicted"]) == row["predicted"]
        p = float(values["prob_lesion"])
        assert values["max_probability"] == pytest.approx(max(p, 1 - p), abs=1e-5)
        expected_entropy = 0.0 if p in (0.0, 1.0) else -(p * math.log(p) + (1 - p) * math.log(1 - p)) / math.log(2)
        assert values["entropy"] == pytest.approx(expected_entropy, abs=1e-4)
    assert {r["case_id"] for r in _rows(batch.report)} == set(predicted)  # the report is written too

    # A bad file fails alone; a rerun skips what is done.
    (images / "test" / "zz_broken.nii").write_bytes(b"not a nifti at all")
    again = predictor.predict_folder(images / "test", out, progress=False)
    statuses = {r.case_id: r.status for r in again.results}
    assert statuses.pop("zz_broken") == "failed" and set(statuses.values()) == {"skipped"}
    assert again.n_failed == 1 and again.counts["skipped"] == 12
    assert "zz_broken.nii: could not be read" in again.results[-1].error
    assert "zz_broken.nii: could not be read" in _rows(again.report)[-1]["error"]
    assert again.summary_dict()["failed"] == {"zz_broken": again.results[-1].error}
    # the CLI exits 1 when a case failed, and names it
    assert main(["predict", "--model", str(result.model_uri), "--input", str(images / "test"), "--output", str(out),
                 "--tracking-uri", uri, "--no-progress", "--no-tracking"]) == EXIT_FAILED
    assert "FAILED zz_broken" in capsys.readouterr().out

    # Fine-tuning from the logged model with a frozen backbone: the backbone stays the source's.
    (tmp_path / "tuned").mkdir()
    tuned_config = classification_config(tmp_path / "tuned", manifest, images, uri,
                                         model={"init_from": result.model_uri, "freeze": ["backbone"]},
                                         train={"max_epochs": 1})
    tuned = train_run(tuned_config)
    source_weights = load_checkpoint(run_dir / "checkpoints" / "best.safetensors")["model"]
    tuned_weights = load_checkpoint(tuned.run_dir / "checkpoints" / "best.safetensors")["model"]
    assert torch.equal(source_weights["features.0.weight"], tuned_weights["features.0.weight"])
    assert not torch.equal(source_weights["classifier.5.weight"], tuned_weights["classifier.5.weight"])


def test_3d_run_with_a_resnet(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "toy3d.npz", shape=(12, 13, 11), counts=(16, 6, 6))
    import_medmnist(npz, tmp_path / "manifest.csv", tmp_path / "images", progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = classification_config(tmp_path, tmp_path / "manifest.csv", tmp_path / "images", uri, dims=3,
                                   size=(12, 12, 12), model={"name": "resnet18", "spatial_dims": 3, "widen_factor": 0.125,
                                                             "stem": "strided", "norm": "batch"},
                                   augment=[{"name": "flip", "prob": 0.5}, {"name": "affine", "prob": 0.5}],
                                   loss={"name": "focal", "class_weights": None},
                                   data={"labels": {0: "class_0", 1: "class_1"}},
                                   train={"max_epochs": 2}, validation={"tsne": False})
    result = train_run(config)
    assert 0.0 <= result.metrics["test/auc"] <= 1.0
    assert json.loads((result.run_dir / "contract.json").read_text())["resize"] == [12, 12, 12]


# Slow: two processes matching one through the shared engine (torchrun, gloo, DDP, the shared sample
# stream and its per-sample seeds, DistContext's sum and gather) is proved in the default run by
# tests/engine/test_distributed.py::test_two_gloo_processes_match_one_process_with_the_same_global_batch;
# classification's own part, scoring predictions gathered from every process, by
# tests/tasks/classification/test_metrics.py (test_an_empty_share_joins_the_gather and the test above it).
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, imported) -> None:
    """Predictions are gathered from both processes before scoring: AUC, ACC and the loss curve
    of `--nproc 2` equal those of one process (LeNet has no batch norm to differ per process)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    manifest, images = imported
    curves = {}
    for nproc, batch in ((2, 4), (1, 8)):
        uri = f"sqlite:///{tmp_path / f'{nproc}.db'}"
        (tmp_path / str(nproc)).mkdir()
        # one shared sample stream (a memory cache would give each process its own shard and stream)
        config = classification_config(tmp_path / str(nproc), manifest, images, uri, train={"max_epochs": 2},
                                       data={"cache": "none"})
        done = subprocess.run([sys.executable, "-m", "medseg", "run", str(config), "--nproc", str(nproc),
                               "--deterministic", "--no-progress", "--set", f"train.batch_size={batch}"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_ENABLE_ASYNC_LOGGING": "false"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        curves[nproc] = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                       key=lambda m: m.step)]
                         for key in ("train/loss", "val/auc", "val/acc", "test/auc")}
    for key, one in curves[1].items():
        assert len(one) == len(curves[2][key]) > 0
        assert curves[2][key] == pytest.approx(one, abs=2e-3), key


def test_ordinal_grades_with_the_cumulative_head(tmp_path: Path) -> None:
    npz = write_medmnist_npz(tmp_path / "grades.npz", counts=(30, 9, 9), classes=3)
    import_medmnist(npz, tmp_path / "manifest.csv", tmp_path / "images", progress=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = classification_config(tmp_path, tmp_path / "manifest.csv", tmp_path / "images", uri,
                                   data={"labels": {0: "grade_0", 1: "grade_1", 2: "grade_2"}, "ordinal": True},
                                   loss={"name": "ordinal", "class_weights": None}, validation={"tsne": False})
    result = train_run(config)
    for key in ("test/mae", "test/qwk", "test/auc", "val/recall/grade_2"):
        assert key in result.metrics, key
    run_dir = result.run_dir
    contract = json.loads((run_dir / "contract.json").read_text())
    assert contract["output_activation"] == "ordinal"
    # cumulative links have no softmax to calibrate: no temperature, and `model calibrate` says why
    assert "calibration" not in contract and "test/ece" in result.metrics
    with pytest.raises(UsageError, match="no softmax output to calibrate"):
        medseg.calibrate_run(run_dir, progress=False)
    rows = _rows(run_dir / "evaluation" / "test_cases.csv")
    sums = [sum(float(r[f"prob_grade_{k}"]) for k in range(3)) for r in rows]
    assert sums == pytest.approx([1.0] * len(rows), abs=1e-5)
