"""A tiny end-to-end training run on awkward synthetic volumes, checked through MLflow."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import mlflow
import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg
from medseg.cli import EXIT_FAILED, main
from medseg.data.build import build_manifest
from medseg.data.manifest import file_sha256
from medseg.errors import DataVerificationError, RunError
from tests.conftest import REPO, artifact_paths, tiny_config, train_run

LABEL_NAMES = ("blob1", "blob2")


def test_run_logs_metrics_artifacts_and_a_loadable_model(tmp_path: Path, tiny_run_inputs) -> None:
    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri)

    result = train_run(config)
    assert result.run_id and result.model_uri
    assert result.tracking_uri == uri
    assert result.run_dir.parent.resolve() == (tmp_path / "runs").resolve()
    assert result.summary_path == result.run_dir / "summary.json"
    summary = json.loads(result.summary_path.read_text())  # the result is what summary.json records
    assert (summary["run_id"], summary["model_uri"], summary["tracking_uri"]) == (result.run_id, result.model_uri, uri)
    assert summary["metrics"] == result.metrics

    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for name in LABEL_NAMES:
        history = client.get_metric_history(run.info.run_id, f"val/dice/{name}")
        assert [m.step for m in history] == [1, 2]
        assert all(0.0 <= m.value <= 1.0 for m in history)
        assert f"val/hd95/{name}" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1, 2]
    assert {"val/dice_mean", "lr", "best_val/dice_mean"} <= set(run.data.metrics)
    assert result.metrics["val/dice_mean"] == pytest.approx(run.data.metrics["val/dice_mean"])

    assert run.data.params["train.max_epochs"] == "2"
    assert run.data.params["patch.size"] == "[16, 16, 8]"
    assert run.data.tags["manifest_sha256"] == file_sha256(manifest)
    assert run.data.tags["medseg_version"]
    assert run.data.tags["git_commit"]
    # the MLflow UI's description says what was trained and its headline figures
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("segmentation, ") and "epochs in" in note and "dice_mean" in note

    artifacts = artifact_paths(client, run.info.run_id)
    for expected in ("resolved_config.yaml", "verify_report.json", "plots/learning_curve.png", "contract.json",
                     "history.csv", "summary.json", "evaluation/val_cases.csv"):
        assert expected in artifacts, f"{expected} not logged; have {sorted(artifacts)}"
    assert len([a for a in artifacts if a.startswith("plots/overlay_val_")]) == 2

    assert (result.run_dir / "contract.json").is_file() and (result.run_dir / "checkpoints" / "best.safetensors").is_file()
    model = medseg.Predictor.from_uri(result.model_uri, device="cpu").model.networks[0]
    with torch.no_grad():
        logits = model(torch.randn(1, 1, 16, 16, 8))
    assert logits.shape == (1, 3, 16, 16, 8)
    local = result.run_dir / "model"
    assert sorted(p.name for p in local.iterdir()) == ["medseg_model.json", "weights.safetensors"]
    info = mlflow.models.get_model_info(result.model_uri)
    assert "python_function" in info.flavors and "pytorch" not in info.flavors
    contract = info.metadata["medseg_contract"]
    assert contract["labels"] == {"0": "background", "1": "blob1", "2": "blob2"}
    assert contract["spacing"] == [1.5, 1.5, 2.5] and contract["orientation"] == "RAS"
    assert contract["patch_size"] == [16, 16, 8] and contract["in_channels"] == 1
    assert contract["intensity"]["mode"] == "zscore"


def test_bad_data_stops_the_run_and_marks_it_failed(tmp_path: Path, tiny_run_inputs) -> None:
    dataset, _ = tiny_run_inputs
    label_path = dataset / "labelsTr" / "case_000.nii.gz"
    label = nib.load(label_path)
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, label.affine), label_path)
    manifest = tmp_path / "manifest_broken.csv"
    build_manifest(dataset, manifest, val_fraction=0.34, seed=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri)

    with pytest.raises(DataVerificationError) as raised:
        medseg.train(config, progress=False)
    message = str(raised.value)
    assert "label_values" in message and "case_000" in message and "values [0, 1, 2, 7]" in message

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.status == "FAILED"
    assert "verify_report.json" in artifact_paths(client, run.info.run_id)
    assert "train/loss" not in run.data.metrics


def test_wall_clock_budget_ends_training_and_still_validates(tmp_path: Path, tiny_run_inputs) -> None:
    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, train={"max_epochs": 1000, "max_minutes": 0.05})
    result = train_run(config)
    epochs = result.metrics["train/epochs"]
    assert epochs is not None and 1 <= epochs < 1000
    assert result.metrics["val/dice_mean"] is not None
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_id == result.run_id
    assert run.data.metrics["train/epochs"] == epochs
    assert "val/dice_mean" in run.data.metrics


def test_resume_without_an_unfinished_run_is_a_clear_error(tmp_path: Path, tiny_run_inputs, capsys) -> None:
    dataset, manifest = tiny_run_inputs
    config = tiny_config(tmp_path, dataset, manifest, f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(RunError, match="no unfinished run"):
        medseg.train(config, resume=True, progress=False)
    # the CLI's --resume: the same message, exit code 1
    assert main(["run", str(config), "--resume", "--no-progress"]) == EXIT_FAILED
    assert "no unfinished run" in capsys.readouterr().err


def _write_2d_dataset(root: Path, n_cases: int = 6) -> Path:
    rng = np.random.default_rng(5)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir(parents=True)
    affine = np.diag([0.7, 1.3, 1.0, 1.0])
    affine[:2, 3] = (-20.0, 13.5)
    for i in range(n_cases):
        label = np.zeros((37, 29), dtype=np.uint8)
        cx, cy = rng.integers(10, 27), rng.integers(8, 21)
        label[cx - 5:cx + 5, cy - 4:cy + 4] = 1
        label[cx - 2:cx + 2, cy - 2:cy + 2] = 2
        image = (rng.normal(0, 0.2, label.shape) + label * 1.2).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"slice_{i:02d}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"slice_{i:02d}.nii.gz")
    return root


def test_2d_dynunet_with_disk_cache_bf16_and_model_registry(tmp_path: Path) -> None:
    dataset = _write_2d_dataset(tmp_path / "data2d")
    manifest = tmp_path / "manifest2d.csv"
    build_manifest(dataset, manifest, val_fraction=0.34, seed=0)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(
        tmp_path, dataset, manifest, uri,
        data={"cache": "disk", "cache_dir": str(tmp_path / "cache")},
        preprocess={"orientation": "RA", "spacing": None, "intensity": {"mode": "percentile"}},
        augment=[{"name": "rot90", "prob": 0.5}, {"name": "elastic", "prob": 0.3}],
        patch={"size": [16, 16], "samples_per_volume": 2, "sampler": "per_class"},
        model={"name": "dynunet", "spatial_dims": 2, "channels": [8, 16, 32]},
        loss={"name": "dice_focal"},
        optim={"name": "sgd", "lr": 0.01, "schedule": "poly"},
        train={"max_epochs": 3, "precision": "bf16", "early_stopping_patience": 5},
        tracking={"uri": uri, "experiment": "tests", "register_model_as": "tiny-2d"},
    )
    with warnings.catch_warnings():
        # MONAI only warns when it cannot read its cache back, then silently recomputes.
        warnings.filterwarnings("error", message=".*Corrupt cache file.*")
        result = train_run(config)
    assert list((tmp_path / "cache").rglob("index.json")), "the disk cache stored nothing"
    model = medseg.Predictor.from_uri("models:/tiny-2d/1", device="cpu").model.networks[0]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16)).shape == (1, 3, 16, 16)
    assert "val/dice/blob2" in result.metrics
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
    assert run.info.run_id == result.run_id and "val/dice/blob2" in run.data.metrics


# The default run covers this in tests/test_cli.py::test_demo_runs_from_any_folder_and_writes_only_under_its_out
# (the same config and data, one epoch, the same metrics asserted; validating every epoch, no overlays) and
# tests/test_newcomer.py (`medseg demo --set train.max_epochs=1` from the wheel); this one took 2 min more.
@pytest.mark.slow
def test_demo_config_runs_one_epoch_on_the_shipped_real_data(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    result = train_run("configs/demo_segmentation.yaml", overrides=[
        "train.max_epochs=1", f"output_dir={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}"])
    assert result.run_dir.parent.resolve() == (tmp_path / "runs").resolve()
    assert set(result.metrics) >= {"val/dice/anterior", "val/dice/posterior", "best_val/dice_mean_per_case"}
    assert 0.0 <= result.metrics["val/dice_mean"] <= 1.0


def test_resume_refuses_a_finished_run_a_missing_checkpoint_and_a_changed_config(tmp_path: Path,
                                                                                tiny_run_inputs) -> None:
    from medseg.engine.runner import check_resumable

    dataset, manifest = tiny_run_inputs
    config = tiny_config(tmp_path, dataset, manifest, f"sqlite:///{tmp_path / 'mlflow.db'}")
    result = train_run(config)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.resolve() == result.run_dir.resolve()
    cfg = medseg.load_config(config)
    with pytest.raises(RunError, match="that run finished"):
        check_resumable(run_dir, cfg)
    (run_dir / "summary.json").unlink()
    check_resumable(run_dir, medseg.load_config(config, ["train.max_epochs=9"]))  # budgets may change
    with pytest.raises(RunError, match=r"optim.lr: 0.01 -> 0.5"):
        check_resumable(run_dir, medseg.load_config(config, ["optim.lr=0.5"]))
    with pytest.raises(RunError, match="no checkpoints/last.safetensors"):
        check_resumable(tmp_path / "runs" / "typo", cfg)
