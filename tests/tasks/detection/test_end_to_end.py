"""Detection end to end on a tiny seeded synthetic lesion set (tilted, anisotropic CT grids): the
config writes its data, one short run trains RetinaNet on patches, validates and evaluates by
FROC / mAP, packages the network and its contract; predict reads the contract and writes every
case's boxes (world mm and voxel indices) in a JSON and a row of predictions.csv."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from safetensors.numpy import load_file

import medseg
from medseg.data.manifest import read_manifest
from medseg.tasks.detection.boxes import voxel_to_world
from tests.conftest import KILL_AT_SECOND_CHECKPOINT, REPO, artifact_paths, train_run


def detection_config(tmp: Path, **train: object) -> Path:
    """A tiny 3D detection config on 5 synthetic scans of about 48 x 48 x 10 voxels."""
    config = tmp / "detection.yaml"
    config.write_text(yaml.safe_dump({
        "task": "detection", "seed": 0, "output_dir": str(tmp / "runs"),
        "data": {"manifest": str(tmp / "lesions.csv"), "root": str(tmp / "data"), "channels": ["CT"],
                 "labels": {0: "background", 1: "lesion"}, "boxes": {"min_volume_mm3": 5.0},
                 "synthetic": {"cases": 5, "shape": [48, 48, 10], "spacing": [1.6, 1.6, 4.0], "lesions": [1, 3],
                               "radius_mm": [4.0, 7.0]}},
        "preprocess": {"orientation": "RAS", "intensity": {"mode": "ct_window", "window": [-160, 240]}},
        "augment": [{"name": "flip", "prob": 0.5, "axes": [0]}],
        "patch": {"size": [32, 32, 8], "samples_per_volume": 2},
        "model": {"channels": [8, 8, 16, 16], "fpn_channels": 8,
                  "anchor_shapes": [[4, 4, 2], [7, 7, 3]]},
        "detect": {"score_threshold": 0.0, "max_boxes": 10},  # an untrained network's boxes score ~0.01: keep them
        "optim": {"lr": 0.001},
        "train": {"max_epochs": 2, "batch_size": 2, "iterations_per_epoch": 2, "val_interval": 1, "num_threads": 1,
                  "device": "cpu", "precision": "fp32", **train},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "detection"},
    }))
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("detection")
    config = detection_config(tmp)
    return {"result": train_run(config), "tmp": tmp, "uri": f"sqlite:///{tmp / 'mlflow.db'}"}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_run_logs_froc_and_map_and_a_row_per_scan(trained: dict) -> None:
    result, client = trained["result"], MlflowClient(trained["uri"])
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(result.run_id, "val/froc")] == [1, 2]
    for key in ("test/sensitivity_at_1fp", "test/sensitivity_at_2fp", "test/sensitivity_at_4fp", "test/froc",
                "test/map_iou0.1", "test/map_iou0.5", "best_val/froc", "train/loss"):
        assert key in run.data.metrics, key
    assert 0 <= run.data.metrics["test/froc"] <= 1
    artifacts = artifact_paths(client, result.run_id)
    assert "evaluation/test_cases.csv" in artifacts
    val_ids = [c.case_id for c in read_manifest(trained["tmp"] / "lesions.csv").split("val")]
    for epoch in (1, 2):  # the boxes drawn on the first validation scan at every validation
        assert any(p.startswith(f"images/val~boxes~{val_ids[0]}+step+{epoch}+") for p in artifacts), sorted(artifacts)
    rows = _rows(result.run_dir / "evaluation" / "test_cases.csv")
    test_ids = [c.case_id for c in read_manifest(trained["tmp"] / "lesions.csv").split("test")]
    assert [r["case_id"] for r in rows] == test_ids
    assert run.data.metrics["test/reference_boxes"] == sum(int(r["reference_boxes"]) for r in rows) > 0


def test_predict_writes_boxes_in_world_mm_and_voxels_of_the_input(trained: dict) -> None:
    result, tmp = trained["result"], trained["tmp"]
    contract = json.loads((result.run_dir / "contract.json").read_text())
    assert contract["task"] == "detection" and contract["window"] == [32, 32, 8]
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=trained["uri"])
    images = tmp / "data" / "synthetic_lesions" / "images"
    batch = predictor.predict_folder(images, tmp / "out", progress=False)
    rows = _rows(batch.report)
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows)
    import nibabel as nib

    for row in rows:
        boxes = json.loads(Path(row["boxes"]).read_text())
        assert boxes["frame"] == "RAS" and int(row["n_boxes"]) == len(boxes["boxes"]) > 0
        affine = nib.load(images / f"{row['case_id']}.nii.gz").affine
        for box in boxes["boxes"]:  # the voxel box of the stored file encloses the world box's extent
            voxels = np.array([*box["voxels"]["start"], *box["voxels"]["end"]])[None]
            world = voxel_to_world(voxels, affine)[0]
            assert (world[:3] <= np.array(box["world_mm"]["min"]) + 0.01).all()
            assert (world[3:] >= np.array(box["world_mm"]["max"]) - 0.01).all()
            assert 0 <= box["score"] <= 1 and box["class_name"] == "lesion"
        assert boxes["input_shape"] == list(nib.load(images / f"{row['case_id']}.nii.gz").shape)
        assert row["qc_flag"] in ("True", "False") and float(row["edge_boxes"]) <= float(row["confident_boxes"])
    with open(result.run_dir / "evaluation" / "val_cases.csv", newline="") as fh:  # QC: twice the most lesions
        most = max(int(r["reference_boxes"]) for r in csv.DictReader(fh))
    assert contract["qc"] == {"min_boxes": 1.0, "max_confident_boxes": float(max(2 * most, 1)), "min_top_score": 0.5,
                              "max_edge_boxes": 0.0}
    page = (tmp / "out" / "review.html").read_text()  # each scan's best boxes drawn, their scores written
    assert page.count("<figcaption>box 1</figcaption>") == 5 and page.count('class="score"') >= 5


def test_a_broken_scan_fails_alone(trained: dict) -> None:
    result, tmp = trained["result"], trained["tmp"]
    folder = tmp / "mixed"
    folder.mkdir()
    source = tmp / "data" / "synthetic_lesions" / "images" / "scan_000.nii.gz"
    (folder / "scan_000.nii.gz").write_bytes(source.read_bytes())
    (folder / "broken.nii.gz").write_bytes(source.read_bytes()[:200])  # cut short
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=trained["uri"])
    rows = {r["case_id"]: r for r in _rows(predictor.predict_folder(folder, tmp / "mixed_out", progress=False).report)}
    assert rows["scan_000"]["status"] == "ok" and rows["broken"]["status"] == "failed"
    assert "broken.nii.gz" in rows["broken"]["error"]


def _boxes_of(predictor: medseg.Predictor, scan: Path, out: Path) -> list[dict]:
    folder = out / "in"
    folder.mkdir(parents=True)
    (folder / scan.name).write_bytes(scan.read_bytes())
    row = _rows(predictor.predict_folder(folder, out / "boxes", progress=False).report)[0]
    assert row["status"] == "ok", row
    return list(json.loads(Path(row["boxes"]).read_text())["boxes"])


def test_an_ensemble_and_flips_are_fused_into_one_list(trained: dict) -> None:
    result, tmp, uri = trained["result"], trained["tmp"], trained["uri"]
    scan = tmp / "data" / "synthetic_lesions" / "images" / "scan_001.nii.gz"
    single = _boxes_of(medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri), scan, tmp / "one")
    # two copies of one model agree on every box: weighted boxes fusion gives each back as it was
    twice = _boxes_of(medseg.Predictor.from_uri([result.model_uri, result.model_uri], device="cpu", tracking_uri=uri),
                      scan, tmp / "two")
    assert [(b["score"], b["voxels"]) for b in twice] == [(b["score"], b["voxels"]) for b in single]
    # with the flip its training used (axis 0), each flip's boxes are put back and fused
    flipped = _boxes_of(medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri, tta=True), scan,
                        tmp / "tta")
    import nibabel as nib

    shape = nib.load(scan).shape
    assert 0 < len(flipped) <= 10 and flipped != single
    for box in flipped:
        assert all(0 <= s < e <= n + 1 for s, e, n in zip(box["voxels"]["start"], box["voxels"]["end"], shape))


def test_qc_flags_scans_in_the_report_the_summaries_and_the_review_page(trained: dict) -> None:
    result, tmp, uri = trained["result"], trained["tmp"], trained["uri"]
    folder = tmp / "qc_in"
    folder.mkdir()
    for case in ("scan_000", "scan_002"):
        source = tmp / "data" / "synthetic_lesions" / "images" / f"{case}.nii.gz"
        (folder / source.name).write_bytes(source.read_bytes())
    # no box can score 1.01: every scan has only low-confidence boxes
    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri, qc={"min_top_score": 1.01})
    batch = predictor.predict_folder(folder, tmp / "qc_out", progress=False)
    rows = _rows(batch.report)
    assert all(r["qc_flag"] == "True" and "top score" in r["qc_reason"] and "< 1.01" in r["qc_reason"] for r in rows)
    assert batch.summary_dict()["qc_flagged"] == 2
    single = predictor.predict(folder / "scan_000.nii.gz")  # in memory: the same check as the batch's row
    (row,) = [r for r in rows if r["case_id"] == "scan_000"]
    assert single.qc == {"qc_flag": True, "qc_reason": row["qc_reason"]}
    summary = json.loads((tmp / "qc_out" / "qc_summary.json").read_text())
    assert summary["by_reason"]["top score"] == 2 and summary["thresholds"]["min_top_score"] == 1.01
    page = (tmp / "qc_out" / "review.html").read_text()
    assert page.count("only low-confidence boxes: the best scores") == 2 and "a best box scoring at least 1.01" in page


@pytest.mark.slow  # a second training run in a subprocess, then its resumption: 2 minutes on a loaded 2-core host
def test_training_killed_mid_epoch_resumes_from_its_last_checkpoint_to_the_uninterrupted_weights(
        trained: dict, tmp_path: Path) -> None:
    """SIGKILL mid-training, then ``--resume``: the run finishes in the same folder and MLflow run, each
    validation logged once, with the weights of the module's run that was never stopped (same config
    and seed; this one checkpoints every step)."""
    config = detection_config(tmp_path, checkpoint_interval_minutes=0)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    env.pop("MEDSEG_ALLOCATOR", None)
    killed = subprocess.run([sys.executable, "-c", KILL_AT_SECOND_CHECKPOINT, "run", str(config), "--no-progress"], env=env,
                            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").glob("2*")
    assert (run_dir / "checkpoints" / "last.safetensors").is_file() and not (run_dir / "summary.json").exists()
    resumed = train_run(config, resume=True)
    assert resumed.run_dir.resolve() == run_dir.resolve()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert client.get_run(resumed.run_id).info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(resumed.run_id, "val/froc")] == [1, 2]
    want = load_file(str(trained["result"].run_dir / "checkpoints" / "last.safetensors"))
    got = load_file(str(run_dir / "checkpoints" / "last.safetensors"))
    network = [k for k in want if k.startswith("model.")]
    assert network and want.keys() == got.keys()
    assert all(np.array_equal(want[k], got[k]) for k in network), [k for k in network if not np.array_equal(want[k], got[k])][:5]
