"""A logged medseg model the way MLflow users run it (issue 15): ``mlflow.pyfunc.load_model(uri).predict``
in process, ``mlflow models serve`` over HTTP, and ``models:/<name>@champion`` from the registry.

One tiny segmentation U-Net and one tiny 2D classification LeNet are trained once (one epoch) into
one SQLite store; each served model gets one real server process that all of its requests go to.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import shutil
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
import yaml
from mlflow.tracking import MlflowClient

import medseg
from medseg.data.build import build_manifest
from medseg.data.medmnist import import_medmnist
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


@dataclass(frozen=True)
class Roots:
    """The operator's path-mode roots of a served model (``MEDSEG_SERVE_INPUT_ROOT``/``OUTPUT_ROOT``)."""

    input: Path
    output: Path

    @property
    def env(self) -> dict[str, str]:
        return {"MEDSEG_SERVE_INPUT_ROOT": str(self.input), "MEDSEG_SERVE_OUTPUT_ROOT": str(self.output)}

    def add(self, source: Path, name: str | None = None) -> str:
        """Copy ``source`` under the input root; the path a client names (relative to the root)."""
        target = self.input / (name or source.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            shutil.copy2(source, target)
        return target.relative_to(self.input).as_posix()

    def output_of(self, row: dict[str, Any]) -> dict[str, Any]:
        """``row`` with its ``output`` (relative to the output root) as a full path."""
        return {**row, "output": str(self.output / row["output"])}


@pytest.fixture
def roots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Roots:
    """Path mode on: an input and an output root, set in the environment as an operator would."""
    made = Roots(tmp_path / "input_root", tmp_path / "output_root")
    made.input.mkdir()
    made.output.mkdir()
    for key, value in made.env.items():
        monkeypatch.setenv(key, value)
    return made


def _refused(path: str) -> str:
    """The one refusal a served model gives for every path outside its root, missing or not."""
    from medseg.serving.guard import refusal

    return refusal(path)


def _report_statuses(output_dir: Path) -> dict[str, str]:
    with open(output_dir / "predictions.csv", newline="") as fh:
        return {row["case_id"]: row["status"] for row in csv.DictReader(fh)}


@contextmanager
def _served(model: Trained, workdir: Path, startup_timeout_s: float = 180.0,
            extra_env: dict[str, str] | None = None) -> Iterator[str]:
    """``mlflow models serve`` of ``model`` on a free localhost port; yields its URL, then stops it."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "serve.log"
    # mlflow starts the scoring server as `bash -c "exec uvicorn ..."`: uvicorn must be on PATH even
    # when this virtual environment is not activated, or the server exits 127 ("uvicorn: not found").
    env = {**os.environ, "MLFLOW_TRACKING_URI": model.tracking_uri, **(extra_env or {}),
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


def test_pyfunc_writes_each_mask_on_its_inputs_grid_and_refuses_paths_outside_its_root(
        segmentation_model: Trained, oblique_scan: Path, roots: Roots, tmp_path: Path) -> None:
    series = require(TCIA / "T1post")
    outside = tmp_path / "outside.nii.gz"
    shutil.copy2(oblique_scan, outside)
    (roots.input / "link.nii.gz").symlink_to(outside)
    mlflow.set_tracking_uri(segmentation_model.tracking_uri)
    model = mlflow.pyfunc.load_model(segmentation_model.model_uri)
    paths = [roots.add(oblique_scan), roots.add(series, "series"), str(outside), "../outside.nii.gz", "link.nii.gz",
             MISSING, "absent.nii.gz"]

    frame = model.predict(pd.DataFrame({"path": paths}))

    assert list(frame.columns) == SEGMENTATION_COLUMNS
    rows = frame.to_dict("records")
    assert [r["path"] for r in rows] == paths
    assert [r["status"] for r in rows] == ["ok"] + ["failed"] * 6
    # a folder, a path outside, '..', a link out of the root and a missing file: one message, no oracle
    assert [r["error"] for r in rows[1:]] == [_refused(p) for p in paths[1:]]
    assert all(r["output"] == "" for r in rows[1:])
    (row,) = [roots.output_of(r) for r in rows[:1]]
    assert row["case_id"] == "oblique" and Path(row["output"]).parent.parent == roots.output
    _assert_mask_on_nifti_grid(row, oblique_scan)
    assert _report_statuses(Path(row["output"]).parent) == {"oblique": "ok"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("outside")) == ["outside.nii.gz"]


def test_pyfunc_refuses_a_clients_output_folder_and_device_and_works_only_with_roots(
        segmentation_model: Trained, oblique_scan: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(segmentation_model.tracking_uri)
    monkeypatch.delenv("MEDSEG_SERVE_INPUT_ROOT", raising=False)
    monkeypatch.delenv("MEDSEG_SERVE_OUTPUT_ROOT", raising=False)
    frame = pd.DataFrame({"path": [str(oblique_scan)]})
    no_roots = mlflow.pyfunc.load_model(segmentation_model.model_uri)
    with pytest.raises(MlflowException, match="set no input and output roots.*MEDSEG_SERVE_INPUT_ROOT"):
        no_roots.predict(frame)
    roots = Roots(tmp_path / "in", tmp_path / "out")
    roots.input.mkdir(), roots.output.mkdir()
    for key, value in roots.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MEDSEG_SERVE_MAX_ROWS", "2")
    model = mlflow.pyfunc.load_model(segmentation_model.model_uri)
    name = roots.add(oblique_scan)
    with pytest.raises(MlflowException, match=r"params.output_dir '.*elsewhere' refused.*omit output_dir"):
        model.predict(pd.DataFrame({"path": [name]}), params={"output_dir": str(tmp_path / "elsewhere")})
    for device in ("cpu:123456", "cuda:7", "meta"):
        with pytest.raises(MlflowException, match=f"params.device '{device}' refused: this server predicts on cpu"):
            model.predict(pd.DataFrame({"path": [name]}), params={"device": device})
    with pytest.raises(MlflowException, match="3 paths in one request; this server takes at most 2"):
        model.predict(pd.DataFrame({"path": [name] * 3}))
    assert not (tmp_path / "elsewhere").exists()
    (row,) = model.predict(pd.DataFrame({"path": [name]}), params={"device": "cpu"}).to_dict("records")
    assert row["status"] == "ok"


def test_pyfunc_predicts_a_new_scan_that_shares_its_file_name_with_an_earlier_request(
        segmentation_model: Trained, oblique_scan: Path, roots: Roots, tmp_path: Path) -> None:
    # Each request gets a fresh output folder: a later scan with an earlier one's file name is a
    # new case to predict, not finished work to skip, and the earlier mask stays as it was.
    image, _, affine = make_case((19, 25, 13), seed=5)
    later = tmp_path / "later" / oblique_scan.name
    later.parent.mkdir()
    nib.save(nib.Nifti1Image(image, affine), later)
    mlflow.set_tracking_uri(segmentation_model.tracking_uri)
    model = mlflow.pyfunc.load_model(segmentation_model.model_uri)
    (first,) = model.predict(pd.DataFrame({"path": [roots.add(oblique_scan, "a/scan.nii.gz")]})).to_dict("records")

    (row,) = model.predict(pd.DataFrame({"path": [roots.add(later, "b/scan.nii.gz")]})).to_dict("records")

    assert (row["status"], nib.load(roots.output / row["output"]).shape) == ("ok", image.shape), row["error"]
    assert row["output"] != first["output"] and (roots.output / first["output"]).is_file()
    _assert_mask_on_nifti_grid(roots.output_of(row), later)


def test_pyfunc_classification_rows_carry_probabilities_that_sum_to_one(
        classification_model: tuple[Trained, list[Path]], roots: Roots) -> None:
    trained, images = classification_model
    mlflow.set_tracking_uri(trained.tracking_uri)
    model = mlflow.pyfunc.load_model(trained.model_uri)
    paths = [roots.add(images[0]), roots.add(images[1]), MISSING]

    frame = model.predict(pd.DataFrame({"path": paths}))

    assert {"case_id", "path", "status", "error", "output", "predicted", "predicted_name",
            *PROBABILITY_COLUMNS} <= set(frame.columns)
    rows = frame.to_dict("records")
    assert [r["status"] for r in rows] == ["ok", "ok", "failed"]
    assert rows[2]["error"] == _refused(MISSING)
    predictor = medseg.Predictor.from_uri(trained.model_uri, device="cpu", tracking_uri=trained.tracking_uri)
    for row, image in zip(rows[:2], images[:2]):
        assert row["output"] == ""  # a classifier writes no file per case, only the report
        _assert_probabilities(row, predictor.predict(image).class_probabilities)
    (request,) = list(roots.output.iterdir())
    assert _report_statuses(request) == {images[0].stem: "ok", images[1].stem: "ok"}


# ----------------------------------------------------------------------------------- over HTTP


@pytest.mark.timeout(600)
def test_served_segmentation_model_answers_a_batch_and_refuses_a_frame_without_paths(
        segmentation_model: Trained, oblique_scan: Path, roots: Roots, tmp_path: Path) -> None:
    hippocampus = require(HIPPO / "imagesTr" / "hippocampus_001.nii.gz")
    paths = [roots.add(oblique_scan), roots.add(hippocampus), MISSING, "../../etc/passwd"]
    with _served(segmentation_model, tmp_path / "server", extra_env=roots.env) as url:
        status, answer = _invoke(url, {"dataframe_records": [{"path": p} for p in paths],
                                       "params": {"device": "cpu"}})
        assert status == 200, _server_error(answer)
        assert list(answer) == ["predictions"]
        rows = answer["predictions"]
        assert [list(r) for r in rows] == [SEGMENTATION_COLUMNS] * 4
        assert [(r["path"], r["status"]) for r in rows] == list(zip(paths, ["ok", "ok", "failed", "failed"]))
        assert [r["error"] for r in rows[2:]] == [_refused(p) for p in paths[2:]]
        _assert_mask_on_nifti_grid(roots.output_of(rows[0]), oblique_scan)
        _assert_mask_on_nifti_grid(roots.output_of(rows[1]), hippocampus)
        request = (roots.output / rows[0]["output"]).parent
        assert _report_statuses(request) == {"oblique": "ok", "hippocampus_001": "ok"}

        status, answer = _invoke(url, {"dataframe_records": [{"file": paths[0]}]})
        assert status == 400 and "path" in answer["message"], _server_error(answer)
        for params, expected in (({"output_dir": str(tmp_path / "unused")}, "params.output_dir"),
                                 ({"device": "cpu:123456"}, "params.device 'cpu:123456' refused")):
            status, answer = _invoke(url, {"dataframe_records": [{"path": paths[0]}], "params": params})
            assert status == 400 and expected in answer["message"] and "stack_trace" not in answer, answer
        assert not (tmp_path / "unused").exists()
        assert sorted(roots.output.iterdir()) == [request]


@pytest.mark.timeout(600)
def test_served_classification_model_answers_with_the_in_process_probabilities(
        classification_model: tuple[Trained, list[Path]], roots: Roots, tmp_path: Path) -> None:
    trained, images = classification_model
    predictor = medseg.Predictor.from_uri(trained.model_uri, device="cpu", tracking_uri=trained.tracking_uri)
    paths = [*map(roots.add, images), MISSING]
    with _served(trained, tmp_path / "server", extra_env=roots.env) as url:
        status, answer = _invoke(url, {"dataframe_records": [{"path": p} for p in paths]})
    assert status == 200, _server_error(answer)
    rows = answer["predictions"]
    assert [(r["path"], r["status"]) for r in rows] == list(zip(paths, ["ok"] * 4 + ["failed"]))
    assert rows[4]["error"] == _refused(MISSING)
    for row, image in zip(rows[:4], images):
        _assert_probabilities(row, predictor.predict(image).class_probabilities)
    (request,) = list(roots.output.iterdir())
    assert _report_statuses(request) == {image.stem: "ok" for image in images}


@pytest.mark.timeout(600)
def test_mlflow_models_serve_of_a_tampered_medseg_model_runs_none_of_its_code(
        segmentation_model: Trained, tmp_path: Path) -> None:
    # A copy of the logged model with a code/ folder (first on sys.path), a pickled python_model and a
    # graph beside the weights: the real server's loader (medseg's) refuses it before anything loads.
    from tests.engine.test_model_format import CANARY, _foreign_graph

    marker = tmp_path / "marker"
    model = Path(mlflow.artifacts.download_artifacts(artifact_uri=segmentation_model.model_uri,
                                                     tracking_uri=segmentation_model.tracking_uri,
                                                     dst_path=str(tmp_path / "model")))
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    (model / "code").mkdir()
    for module in ("onnxruntime", "openvino", "sitecustomize", "canary_loader"):
        (model / "code" / f"{module}.py").write_text(CANARY.format(marker=str(marker)))
    (model / "python_model.pkl").write_bytes(pickle.dumps(_Canary(marker)))
    mlmodel["flavors"]["python_function"].update(code="code", python_model="python_model.pkl")
    (model / "MLmodel").write_text(yaml.safe_dump(mlmodel))
    pytest.importorskip("onnx")
    _foreign_graph(model / "data" / "medseg_model" / "network.onnx")
    tampered = Trained(str(model), segmentation_model.run_id, segmentation_model.tracking_uri)

    with pytest.raises(pytest.fail.Exception, match="did not come up"):
        with _served(tampered, tmp_path / "server", startup_timeout_s=120,
                     extra_env={"MEDSEG_BACKEND": "onnxruntime"}):
            pass
    log = (tmp_path / "server" / "serve.log").read_text(errors="replace")
    for named in ("- MLmodel: expected no code entry", "- code: expected", "- python_model.pkl: expected",
                  "- data/medseg_model/network.onnx: expected"):
        assert named in log, log[-3000:]
    assert not marker.exists(), "the tampered model's code ran in the server"


class _Canary:
    """Unpickling this creates the marker file: the stand-in for a pickled python_model's code."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):  # noqa: ANN204 - pickle protocol
        return (open, (self.path, "w"))


# ----------------------------------------------------------------------------------- registry


def test_champion_alias_names_the_trained_model_for_predictor_and_pyfunc(
        segmentation_model: Trained, oblique_scan: Path, roots: Roots) -> None:
    alias_uri = f"models:/{REGISTERED_NAME}@champion"
    version = MlflowClient(segmentation_model.tracking_uri).get_model_version_by_alias(REGISTERED_NAME, "champion")
    assert version.run_id == segmentation_model.run_id
    assert version.source == segmentation_model.model_uri

    prediction = medseg.Predictor.from_uri(alias_uri, device="cpu",
                                           tracking_uri=segmentation_model.tracking_uri).predict(oblique_scan)
    original = nib.load(oblique_scan)
    assert prediction.label_map is not None and prediction.label_map.shape == original.shape
    np.testing.assert_allclose(prediction.affine, original.affine, atol=1e-5)

    frame = mlflow.pyfunc.load_model(alias_uri).predict(pd.DataFrame({"path": [roots.add(oblique_scan)]}))
    (row,) = [roots.output_of(r) for r in frame.to_dict("records")]
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
