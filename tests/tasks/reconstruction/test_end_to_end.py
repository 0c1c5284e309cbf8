"""Reconstruction end to end: tiny runs that log every metric beside its baseline, image grids and a
model that ``medseg.Predictor`` uses to write reconstructions on the input's own grid."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.data.build import build_manifest
from tests.conftest import artifact_paths, train_run, write_config, write_msd_dataset

METRICS = ("psnr", "ssim", "nmse")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _config(tmp_path: Path, uri: str, **sections: dict) -> Path:
    cfg = {
        "task": "reconstruction",
        "seed": 0,
        "output_dir": str(tmp_path / "runs"),
        "recon": {"problem": "mri", "image_size": [32, 24], "slices_per_volume": 2},
        "model": {"name": "unet_dc", "channels": [4, 8, 16], "num_res_units": 1},
        "optim": {"lr": 0.005},
        "train": {"max_epochs": 2, "batch_size": 2, "iterations_per_epoch": 3, "num_threads": 1},
        "validation": {"overlays": 1},
        "tracking": {"uri": uri, "experiment": "tests"},
    }
    return write_config(tmp_path, cfg, sections)


@pytest.fixture
def volumes(tmp_path: Path) -> tuple[Path, Path]:
    """Synthetic MR-like volumes on oblique, anisotropic grids (29 x 37 x 23) and their manifest."""
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=6)
    manifest = tmp_path / "manifest.csv"
    build_manifest(dataset, manifest, val_fraction=0.34, test_fraction=0.17, seed=1)
    return dataset, manifest


def test_mri_run_logs_metrics_beside_the_baseline_and_predicts_on_the_input_grid(tmp_path: Path, volumes) -> None:
    dataset, manifest = volumes
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # slices along the first axis: the slice-axis move must be undone when writing outputs
    config = _config(tmp_path, uri, data={"manifest": str(manifest), "root": str(dataset)},
                     recon={"slice_axis": 0, "mask": "random", "acceleration": 4})
    result = train_run(config)
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    for split in ("val", "best_val", "test"):
        for metric in METRICS:
            for key in (f"{split}/{metric}", f"{split}/zero_filled_{metric}", f"{split}/{metric}_gain"):
                assert key in run.data.metrics, key
    history = client.get_metric_history(run.info.run_id, "val/ssim")
    assert sorted(m.step for m in history) == [1, 2]
    artifacts = artifact_paths(client, run.info.run_id)
    assert "evaluation/test_cases.csv" in artifacts and "plots/learning_curve.png" in artifacts
    assert any(a.startswith("plots/recon_test_") and a.endswith(".png") for a in artifacts)
    for key in ("test/psnr", "test/zero_filled_psnr", "test/psnr_gain"):
        assert result.metrics[key] == pytest.approx(run.data.metrics[key]), key
    contract = json.loads((result.run_dir / "contract.json").read_text())
    assert contract["task"] == "reconstruction" and contract["recon"]["baseline"] == "zero_filled"
    assert contract["recon"]["center_fraction"] == pytest.approx(0.08)

    rows = _rows(result.run_dir / "evaluation" / "test_cases.csv")
    assert rows and {"case_id", "slices", "psnr", "zero_filled_psnr", "psnr_gain", "ssim", "nmse"} <= set(rows[0])
    mean_psnr = np.mean([float(r["psnr"]) for r in rows])
    assert run.data.metrics["test/psnr"] == pytest.approx(mean_psnr, abs=1e-3)
    assert all(int(r["slices"]) == 29 for r in rows)  # every slice along axis 0 is scored

    # predict: the same (case-seeded) measurement, outputs on each input's own oblique grid
    inputs = tmp_path / "to_predict"
    inputs.mkdir()
    names = sorted(p.name for p in (dataset / "imagesTr").iterdir())[:2]
    for name in names:
        (inputs / name).write_bytes((dataset / "imagesTr" / name).read_bytes())
    (inputs / "broken.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "predicted"
    predictor = medseg.Predictor.from_uri(result.model_uri, tracking_uri=uri)
    batch = predictor.predict_folder(inputs, out, progress=False)
    assert batch.n_failed == 1 and batch.counts["ok"] == len(names)  # one case failed ...
    report = {r.case_id: r for r in batch.results}
    assert report["broken"].status == "failed" and "broken.nii.gz" in report["broken"].error
    assert {r["case_id"]: r["status"] for r in _rows(batch.report)} == {k: r.status for k, r in report.items()}
    for name in names:  # ... and the others went on
        case_id = name.removesuffix(".nii.gz")
        case = report[case_id]
        assert case.status == "ok" and float(case.values["zero_filled_psnr"]) > 0 and case.values["slices"] == 29
        assert case.outputs["output"] == str(out / f"{case_id}_reconstruction.nii.gz")
        source = nib.load(inputs / name)
        for suffix in ("reconstruction", "zero_filled"):
            written = nib.load(out / f"{case_id}_{suffix}.nii.gz")
            assert written.shape == source.shape
            assert np.allclose(written.affine, source.affine, atol=1e-4)
        # intensities come back in the input's units, and the reconstruction resembles the input
        recon = np.asarray(nib.load(out / f"{case_id}_reconstruction.nii.gz").dataobj)
        original = np.asarray(source.dataobj, dtype=np.float32)
        assert abs(float(recon.mean()) - float(original.mean())) < 0.2 * float(np.abs(original).mean())
    # a rerun skips finished cases
    again = {r.case_id: r for r in predictor.predict_folder(inputs, out, progress=False).results}
    assert all(again[n.removesuffix(".nii.gz")].status == "skipped" for n in names)


def test_ct_run_generates_phantoms_scores_real_images_and_predicts_measured_inputs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    data = tmp_path / "phantoms"
    config = _config(tmp_path, uri, data={"manifest": str(tmp_path / "phantoms.csv"), "root": str(data)},
                     recon={"problem": "ct", "image_size": [32, 32], "views": 20, "slices_per_volume": 1,
                            "phantoms": {"train": 6, "val": 2, "test": 2, "size": 32},
                            "real_images": ["pydicom:CT_small.dcm"]},
                     model={"name": "unet", "channels": [4, 8, 16], "num_res_units": 1})
    result = train_run(config)
    run = MlflowClient(uri).get_run(result.run_id)
    for key in ("test/psnr", "test/fbp_psnr", "test/psnr_gain", "real/psnr", "real/fbp_psnr", "real/ssim"):
        assert key in run.data.metrics, key
    assert (data / "phantoms.json").is_file() and len(_rows(tmp_path / "phantoms.csv")) == 10
    assert result.metrics["real/psnr"] == pytest.approx(run.data.metrics["real/psnr"])
    real = _rows(result.run_dir / "evaluation" / "real_cases.csv")
    assert [r["case_id"] for r in real] == ["CT_small"]

    # measured: the inputs already are FBP images; the network's output is written, on their grid
    inputs = tmp_path / "fbp_images"
    inputs.mkdir()
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    affine[:3, 3] = (-11.0, 4.0, 30.0)
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((30, 27, 2)).astype(np.float32), affine),
             inputs / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.random.default_rng(1).random((25, 19)).astype(np.float32), affine),
             inputs / "flat.nii.gz")  # a 2D image: a volume of one slice
    out = tmp_path / "restored"
    batch = medseg.Predictor.from_uri(result.model_uri, tracking_uri=uri, measured=True).predict_folder(
        inputs, out, progress=False)
    assert batch.n_failed == 0 and batch.counts["ok"] == 2
    for name, shape in (("scan", (30, 27, 2)), ("flat", (25, 19))):
        written = nib.load(out / f"{name}_reconstruction.nii.gz")
        assert written.shape == shape and np.allclose(written.affine, affine)
        assert not (out / f"{name}_fbp.nii.gz").exists()
    # nothing to compare with when measured
    assert all(r.status == "ok" and r.values.get("psnr") is None for r in batch.results)
    assert all(r["status"] == "ok" and r["psnr"] == "" for r in _rows(batch.report))


# Slow: two processes matching one through the shared engine (torchrun, gloo, DDP, the shared sample
# stream and its per-sample seeds, DistContext's sum and gather) is proved in the default run by
# tests/engine/test_distributed.py::test_two_gloo_processes_match_one_process_with_the_same_global_batch;
# reconstruction's own part is a DistContext.sum_ of its validation totals, the call segmentation's
# validation makes in that test.
@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path: Path, volumes) -> None:
    """Each process simulates its share of the sample stream's measurements and scores its share of
    the validation volumes; the all-reduced curves equal one process's (instance norm only)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    dataset, manifest = volumes
    curves = {}
    for nproc, batch in ((2, 1), (1, 2)):
        folder = tmp_path / str(nproc)
        folder.mkdir()
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        config = _config(folder, uri, data={"manifest": str(manifest), "root": str(dataset), "cache": "none"},
                         train={"max_epochs": 2, "batch_size": batch, "iterations_per_epoch": 3})
        done = subprocess.run([sys.executable, "-m", "medseg", "run", str(config), "--nproc", str(nproc),
                               "--deterministic", "--no-progress"], cwd=folder, capture_output=True, text=True,
                              timeout=300, env={**os.environ, "PYTHONPATH": str(REPO),
                                                "MLFLOW_ENABLE_ASYNC_LOGGING": "false"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        client = MlflowClient(uri)
        (run,) = client.search_runs([client.get_experiment_by_name("tests").experiment_id])
        curves[nproc] = {key: [m.value for m in sorted(client.get_metric_history(run.info.run_id, key),
                                                       key=lambda m: m.step)]
                         for key in ("train/loss", "val/psnr", "val/ssim", "val/zero_filled_psnr", "test/psnr")}
    for key, one in curves[1].items():
        assert len(one) == len(curves[2][key]) > 0
        assert curves[2][key] == pytest.approx(one, rel=1e-3), key
