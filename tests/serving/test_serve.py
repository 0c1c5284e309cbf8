"""A logged medseg model the way MLflow users run it (issue 15): ``mlflow.pyfunc.load_model(uri).predict``
in process, ``mlflow models serve`` over HTTP, and ``models:/<name>@champion`` from the registry.

One tiny segmentation U-Net and one tiny 2D classification LeNet are trained once (one epoch) into
one SQLite store; each served model gets one real server process that all of its requests go to.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

import medseg
from medseg.data.manifest import build_manifest
from medseg.data.medmnist import import_medmnist
from medseg.io.geometry import geometry_of
from medseg.io.readers import load_volume
from tests.conftest import (
    HIPPO,
    TCIA,
    classification_config,
    free_port,
    make_case,
    require,
    tiny_config,
    train_run,
    wait_until_answering,
    write_medmnist_npz,
    write_msd_dataset,
)

REGISTERED_NAME = "serving-tiny-unet"
MISSING = "/does/not/exist.nii.gz"
SEGMENTATION_COLUMNS = ["case_id", "path", "status", "error", "output",
                        "voxels_blob1", "voxels_blob2", "volume_ml_blob1", "volume_ml_blob2", "mean_entropy", "agreement",
                        "volume_z_blob1", "volume_z_blob2", "qc_flag", "qc_reason"]
CLASS_NAMES = ("normal", "lesion")
PROBABILITY_COLUMNS = [f"prob_{name}" for name in CLASS_NAMES]


@dataclass(frozen=True)
class Trained:
    """A model logged by ``medseg.train``: the URI it returned, its run, and the store it is in."""

    model_uri: str
    run_id: str
    tracking_uri: str


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One SQLite MLflow store (and its folder) that both models are logged to."""
    folder = tmp_path_factory.mktemp("store")
    return folder, f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture(scope="module")
def segmentation_model(store: tuple[Path, str]) -> Trained:
    """A 3-class U-Net trained one epoch, registered as ``REGISTERED_NAME`` with the alias ``champion``."""
    folder, uri = store
    tmp = folder / "segmentation"
    dataset = write_msd_dataset(tmp / "dataset", n_cases=4)
    build_manifest(dataset, tmp / "manifest.csv", val_fraction=0.25, seed=0)
    config = tiny_config(tmp, dataset, tmp / "manifest.csv", uri,
                         train={"max_epochs": 1, "batch_size": 2, "num_threads": 1},
                         validation={"overlays": 0, "hd95": False},
                         tracking={"register_model_as": REGISTERED_NAME, "model_alias": "champion"})
    result = train_run(config)
    assert result.model_uri and result.model_uri.startswith("models:/m-")
    return Trained(result.model_uri, result.run_id, uri)


@pytest.fixture(scope="module")
def classification_model(store: tuple[Path, str]) -> tuple[Trained, list[Path]]:
    """A 2D LeNet (normal / lesion) trained one epoch on a MedMNIST-layout file, and its test images."""
    folder, uri = store
    tmp = folder / "classification"
    tmp.mkdir()
    npz = write_medmnist_npz(tmp / "toymnist.npz", counts=(16, 4, 4))
    import_medmnist(npz, tmp / "manifest.csv", tmp / "images", labels=dict(enumerate(CLASS_NAMES)), progress=False)
    config = classification_config(tmp, tmp / "manifest.csv", tmp / "images", uri, train={"max_epochs": 1},
                                   validation={"tsne": False})
    result = train_run(config)
    assert result.model_uri and result.model_uri.startswith("models:/m-")
    images = sorted((tmp / "images" / "test").glob("*.nii*"))
    assert len(images) == 4
    return Trained(result.model_uri, result.run_id, uri), images


@pytest.fixture(scope="module")
def oblique_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic scan of odd shape on an oblique, anisotropic grid."""
    image, _, affine = make_case((23, 31, 17), seed=11, spacing=(0.8, 1.3, 2.9))
    path = tmp_path_factory.mktemp("scans") / "oblique.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), path)
    return path


# ----------------------------------------------------------------------------------- helpers


def _assert_mask_on_nifti_grid(row: dict[str, Any], source: Path) -> None:
    """The row's mask has the source's shape and affine, and the row's volumes are the mask's."""
    mask, original = nib.load(row["output"]), nib.load(source)
    assert mask.shape == original.shape
    np.testing.assert_allclose(mask.affine, original.affine, atol=1e-5)
    _assert_volumes_match_mask(row)


def _assert_mask_on_series_grid(row: dict[str, Any], series: Path) -> None:
    """The row's mask lies on the DICOM series' grid (shape, spacing, origin, direction)."""
    mask, source = load_volume(row["output"]), load_volume(series)
    assert tuple(mask.shape) == tuple(source.shape)
    g_mask, g_source = geometry_of(mask), geometry_of(source)
    np.testing.assert_allclose(g_mask.spacing, g_source.spacing, atol=1e-4)
    np.testing.assert_allclose(g_mask.origin, g_source.origin, atol=1e-3)
    np.testing.assert_allclose(g_mask.direction, g_source.direction, atol=1e-4)
    _assert_volumes_match_mask(row)


def _assert_volumes_match_mask(row: dict[str, Any]) -> None:
    mask = nib.load(row["output"])
    labels = np.asarray(mask.dataobj)
    assert (labels > 0).any(), f"the tiny model predicted nothing for {row['path']}: the volume checks would be empty"
    voxel_ml = abs(np.linalg.det(mask.affine[:3, :3])) / 1000
    for value, name in ((1, "blob1"), (2, "blob2")):
        count = int((labels == value).sum())
        assert int(row[f"voxels_{name}"]) == count
        assert float(row[f"volume_ml_{name}"]) == pytest.approx(count * voxel_ml, rel=1e-4, abs=1e-3)


def _assert_probabilities(row: dict[str, Any], expected: dict[str, float]) -> None:
    """The row's class probabilities sum to 1, name their argmax, and are the in-process API's."""
    probabilities = [float(row[column]) for column in PROBABILITY_COLUMNS]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-4)
    assert row["predicted_name"] == CLASS_NAMES[int(np.argmax(probabilities))]
    assert probabilities == pytest.approx([expected[name] for name in CLASS_NAMES], abs=1e-5)


def _report_statuses(output_dir: Path) -> dict[str, str]:
    with open(output_dir / "predictions.csv", newline="") as fh:
        return {row["case_id"]: row["status"] for row in csv.DictReader(fh)}


@contextmanager
def _served(model: Trained, workdir: Path, startup_timeout_s: float = 180.0) -> Iterator[str]:
    """``mlflow models serve`` of ``model`` on a free localhost port; yields its URL, then stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "serve.log"
    # mlflow starts the scoring server as `bash -c "exec uvicorn ..."`: uvicorn must be on PATH even
    # when this virtual environment is not activated, or the server exits 127 ("uvicorn: not found").
    env = {**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    with open(log_path, "wb") as log:
        # A session of its own, so that stopping it also stops the uvicorn child it spawns.
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", model.model_uri, "--env-manager", "local",
             "--host", "127.0.0.1", "--port", str(port)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_until_answering(f"{url}/ping", proc, startup_timeout_s, log_path,
                                 f"mlflow models serve {model.model_uri}")
            yield url
        finally:
            _stop_group(proc)


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait_s in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def _invoke(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST ``body`` as JSON to ``/invocations``: the HTTP status and the decoded answer."""
    request = urllib.request.Request(f"{url}/invocations", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _server_error(answer: dict[str, Any]) -> str:
    """The scoring server's error answer, its stack trace (the model's own exception) included."""
    return f"{answer.get('message')}\n{str(answer.get('stack_trace', ''))[-3000:]}"


# ----------------------------------------------------------------------------------- in process


def test_pyfunc_writes_each_mask_on_its_inputs_grid_and_fails_only_the_missing_path(
        segmentation_model: Trained, oblique_scan: Path, tmp_path: Path) -> None:
    series = require(TCIA / "T1post")
    mlflow.set_tracking_uri(segmentation_model.tracking_uri)
    model = mlflow.pyfunc.load_model(segmentation_model.model_uri)
    out = tmp_path / "out"
    paths = [str(oblique_scan), str(series), MISSING]

    frame = model.predict(pd.DataFrame({"path": paths}), params={"output_dir": str(out)})

    assert list(frame.columns) == SEGMENTATION_COLUMNS
    rows = frame.to_dict("records")
    assert [r["path"] for r in rows] == paths
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert [r["case_id"] for r in rows[:2]] == ["oblique", "T1post"]
    assert rows[2]["error"] == f"{MISSING}: no such file or folder" and rows[2]["output"] == ""
    assert all(r["error"] == "" and Path(r["output"]).parent == out for r in rows[:2])
    _assert_mask_on_nifti_grid(rows[0], oblique_scan)
    _assert_mask_on_series_grid(rows[1], series)
    assert _report_statuses(out) == {"oblique": "ok", "T1post": "ok", "exist": "failed"}


def test_pyfunc_predicts_a_new_scan_that_shares_its_file_name_with_an_earlier_request(
        segmentation_model: Trained, oblique_scan: Path, tmp_path: Path) -> None:
    # A served model is called again and again with one output folder: a later scan with an
    # earlier one's file name is a new case to predict, not finished work to skip.
    image, _, affine = make_case((19, 25, 13), seed=5)
    later = tmp_path / "later" / oblique_scan.name
    later.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine), later)
    mlflow.set_tracking_uri(segmentation_model.tracking_uri)
    model = mlflow.pyfunc.load_model(segmentation_model.model_uri)
    out = tmp_path / "out"
    model.predict(pd.DataFrame({"path": [str(oblique_scan)]}), params={"output_dir": str(out)})

    (row,) = model.predict(pd.DataFrame({"path": [str(later)]}), params={"output_dir": str(out)}).to_dict("records")

    assert (row["status"], nib.load(row["output"]).shape) == ("ok", image.shape), row["error"]
    _assert_mask_on_nifti_grid(row, later)


def test_pyfunc_classification_rows_carry_probabilities_that_sum_to_one(
        classification_model: tuple[Trained, list[Path]], tmp_path: Path) -> None:
    trained, images = classification_model
    mlflow.set_tracking_uri(trained.tracking_uri)
    model = mlflow.pyfunc.load_model(trained.model_uri)
    out = tmp_path / "out"
    paths = [str(images[0]), str(images[1]), MISSING]

    frame = model.predict(pd.DataFrame({"path": paths}), params={"output_dir": str(out)})

    assert {"case_id", "path", "status", "error", "output", "predicted", "predicted_name",
            *PROBABILITY_COLUMNS} <= set(frame.columns)
    rows = frame.to_dict("records")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["error"] == f"{MISSING}: no such file or folder"
    predictor = medseg.Predictor.from_uri(trained.model_uri, device="cpu", tracking_uri=trained.tracking_uri)
    for row, image in zip(rows[:2], images[:2]):
        assert row["output"] == ""  # a classifier writes no file per case, only the report
        _assert_probabilities(row, predictor.predict(image).class_probabilities)
    assert _report_statuses(out) == {images[0].stem: "ok", images[1].stem: "ok", "exist": "failed"}


# ----------------------------------------------------------------------------------- over HTTP


@pytest.mark.timeout(600)
def test_served_segmentation_model_answers_a_batch_and_refuses_a_frame_without_paths(
        segmentation_model: Trained, oblique_scan: Path, tmp_path: Path) -> None:
    hippocampus = require(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    out = tmp_path / "served"
    paths = [str(oblique_scan), str(hippocampus), MISSING]
    with _served(segmentation_model, tmp_path / "server") as url:
        status, answer = _invoke(url, {"dataframe_records": [{"path": p} for p in paths],
                                       "params": {"output_dir": str(out), "device": "cpu"}})
        assert status == 200, _server_error(answer)
        assert list(answer) == ["predictions"]
        rows = answer["predictions"]
        assert [list(r) for r in rows] == [SEGMENTATION_COLUMNS] * 3
        assert [(r["path"], r["status"]) for r in rows] == list(zip(paths, ["ok", "ok", "failed"]))
        assert rows[2]["error"] == f"{MISSING}: no such file or folder"
        _assert_mask_on_nifti_grid(rows[0], oblique_scan)
        _assert_mask_on_nifti_grid(rows[1], hippocampus)
        assert _report_statuses(out) == {"oblique": "ok", "hippocampus_001": "ok", "exist": "failed"}

        status, answer = _invoke(url, {"dataframe_records": [{"file": str(oblique_scan)}],
                                       "params": {"output_dir": str(tmp_path / "unused")}})
        assert status == 400 and "path" in answer["message"], _server_error(answer)


@pytest.mark.timeout(600)
def test_served_classification_model_answers_with_the_in_process_probabilities(
        classification_model: tuple[Trained, list[Path]], tmp_path: Path) -> None:
    trained, images = classification_model
    predictor = medseg.Predictor.from_uri(trained.model_uri, device="cpu", tracking_uri=trained.tracking_uri)
    out = tmp_path / "served"
    paths = [*map(str, images), MISSING]
    with _served(trained, tmp_path / "server") as url:
        status, answer = _invoke(url, {"dataframe_records": [{"path": p} for p in paths],
                                       "params": {"output_dir": str(out)}})
    assert status == 200, _server_error(answer)
    rows = answer["predictions"]
    assert [(r["path"], r["status"]) for r in rows] == list(zip(paths, ["ok"] * 4 + ["failed"]))
    assert rows[4]["error"] == f"{MISSING}: no such file or folder"
    for row, image in zip(rows[:4], images):
        _assert_probabilities(row, predictor.predict(image).class_probabilities)
    assert _report_statuses(out) == {**{image.stem: "ok" for image in images}, "exist": "failed"}


# ----------------------------------------------------------------------------------- registry


def test_champion_alias_names_the_trained_model_for_predictor_and_pyfunc(
        segmentation_model: Trained, oblique_scan: Path, tmp_path: Path) -> None:
    alias_uri = f"models:/{REGISTERED_NAME}@champion"
    version = MlflowClient(segmentation_model.tracking_uri).get_model_version_by_alias(REGISTERED_NAME, "champion")
    assert version.run_id == segmentation_model.run_id
    assert version.source == segmentation_model.model_uri

    prediction = medseg.Predictor.from_uri(alias_uri, device="cpu",
                                           tracking_uri=segmentation_model.tracking_uri).predict(oblique_scan)
    original = nib.load(oblique_scan)
    assert prediction.label_map is not None and prediction.label_map.shape == original.shape
    np.testing.assert_allclose(prediction.affine, original.affine, atol=1e-5)

    frame = mlflow.pyfunc.load_model(alias_uri).predict(pd.DataFrame({"path": [str(oblique_scan)]}),
                                                        params={"output_dir": str(tmp_path / "out")})
    (row,) = frame.to_dict("records")
    assert row["status"] == "ok"
    _assert_mask_on_nifti_grid(row, oblique_scan)
    assert {name: int(row[f"voxels_{name}"]) for name in ("blob1", "blob2")} == prediction.voxels
    np.testing.assert_array_equal(np.asarray(nib.load(row["output"]).dataobj), prediction.label_map)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_class_probabilities_on_an_exported_backend_match_torch(classification_model: tuple[Trained, list[Path]],
                                                                backend: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip(backend)
    pytest.importorskip("onnx")
    monkeypatch.setenv("MEDSEG_CACHE_DIR", str(tmp_path / "cache"))
    model, images = classification_model
    reference = medseg.Predictor.from_uri(model.model_uri, device="cpu", tracking_uri=model.tracking_uri)
    exported = medseg.Predictor.from_uri(model.model_uri, device="cpu", tracking_uri=model.tracking_uri,
                                         backend=backend)
    assert exported.model.backend == backend
    for image in images:
        want, got = reference.predict(image), exported.predict(image)
        assert set(got.class_probabilities) == set(CLASS_NAMES)
        for name in CLASS_NAMES:
            assert abs(got.class_probabilities[name] - want.class_probabilities[name]) <= 1e-4
        assert got.predicted_class == want.predicted_class
