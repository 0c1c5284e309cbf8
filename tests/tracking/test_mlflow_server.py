"""A real ``mlflow server`` process on localhost: a pipeline run logs to it over HTTP, and what
the MLflow UI shows of it is there when asked through the server's REST API."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg
from medseg.data.build import build_manifest
from medseg.data.manifest import file_sha256
from tests.conftest import free_port, tiny_config, train_run, wait_until_answering, write_msd_dataset


@pytest.fixture(scope="module")
def server_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's store, artifact destination and log."""
    return tmp_path_factory.mktemp("mlflow_server")


@pytest.fixture(scope="module")
def mlflow_server(server_folder: Path) -> Iterator[str]:
    """One server for the module: its start (half a minute on a loaded host) is paid once. The tests
    find their own runs by run id, so sharing its store changes nothing they look at."""
    port = free_port()
    log = open(server_folder / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{server_folder / 'server.db'}",
         "--artifacts-destination", str(server_folder / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", proc, 90, server_folder / "server.log", "mlflow server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pipeline_logs_a_run_and_model_to_a_real_server(tmp_path: Path, tiny_run_inputs, mlflow_server: str,
                                                        server_folder: Path) -> None:
    dataset, manifest = tiny_run_inputs
    # no overlay figures or HD95: images logged through the server are the next test's
    config = tiny_config(tmp_path, dataset, manifest, mlflow_server, train={"max_epochs": 1},
                         validation={"overlays": 0, "hd95": False})
    result = train_run(config)
    assert result.model_uri
    assert result.tracking_uri == mlflow_server

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "val/dice/blob1" in run.data.metrics and "train/loss" in run.data.metrics
    assert run.data.params["tracking.uri"] == mlflow_server
    # the artifacts went through the server into its own artifact store, not a local folder
    stored = [p for p in (server_folder / "server-artifacts").rglob("resolved_config.yaml")
              if result.run_id in p.parts]  # this run's, in the shared server's store
    assert stored, "artifacts were not proxied to the server's artifact destination"

    mlflow.set_tracking_uri(mlflow_server)
    model = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=mlflow_server).model.networks[0]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)


def _rest(server: str, endpoint: str, body: dict[str, Any] | None = None, **query: str) -> dict[str, Any]:
    """A call to the server's REST API (``/api/2.0/mlflow/...``): GET with ``query``, POST with ``body``."""
    url = f"{server}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_the_ui_finds_image_steps_datasets_system_metrics_and_seed_runs_side_by_side(
        tmp_path: Path, mlflow_server: str) -> None:
    dataset = write_msd_dataset(tmp_path / "dataset", n_cases=6)
    manifest = tmp_path / "cases.csv"
    build_manifest(dataset, manifest, seed=1, val_fraction=0.34, test_fraction=0.17)
    config = tiny_config(tmp_path, dataset, manifest, mlflow_server, train={"max_epochs": 2},
                         validation={"overlays": 1, "hd95": False},
                         tracking={"uri": mlflow_server, "experiment": "tests", "system_metrics_interval_s": 0.5})
    result = train_run(config, seeds=2)

    experiment = _rest(mlflow_server, "experiments/get-by-name", experiment_name="tests")["experiment"]
    assert {"key": "mlflow.experimentKind", "value": "custom_model_development"} in experiment["tags"]
    found = _rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]],
                                                  "filter": f"tags.mlflow.parentRunId = '{result.run_id}'"})
    children = {next(p["value"] for p in run["data"]["params"] if p["key"] == "seed"): run for run in found["runs"]}
    assert sorted(children) == ["0", "1"]

    # the parent and its children side by side: the same metric names, the parent's the children's mean
    parent = _rest(mlflow_server, "runs/get", run_id=result.run_id)["run"]
    parent_metrics = {m["key"]: m["value"] for m in parent["data"]["metrics"]}
    child_metrics = [{m["key"]: m["value"] for m in run["data"]["metrics"]} for run in children.values()]
    for key in ("val/dice_mean", "best_val/dice_mean", "train/loss"):
        assert parent_metrics[key] == pytest.approx(sum(m[key] for m in child_metrics) / 2)

    digest = file_sha256(manifest)[:16]
    for seed, child in children.items():
        run_id = child["info"]["run_id"]
        run = _rest(mlflow_server, "runs/get", run_id=run_id)["run"]
        # images: one per validation, the epoch as its step (what the run page's slider moves over)
        listed = _rest(mlflow_server, "artifacts/list", run_id=run_id, path="images").get("files", [])
        steps = sorted(int(m.group(1)) for f in listed if (m := re.search(r"\+step\+(\d+)\+.*\.png$", f["path"])))
        assert steps == [1, 2], f"seed {seed}: image steps {steps} in {[f['path'] for f in listed]}"
        assert all(f["path"].startswith("images/val~overlay~") for f in listed)
        assert {"key": "mlflow.loggedImages", "value": "True"} in run["data"]["tags"]
        # the manifest as the run's datasets, one per role, with its digest and context
        inputs = {next(t["value"] for t in i["tags"] if t["key"] == "mlflow.data.context"): i["dataset"]
                  for i in run["inputs"]["dataset_inputs"]}
        assert sorted(inputs) == ["test", "train", "val"]
        assert {d["digest"] for d in inputs.values()} == {digest}
        assert inputs["train"]["name"] == f"{manifest.stem}/train"
        assert json.loads(inputs["train"]["source"]) == {"uri": str(manifest.resolve())}
        # system metrics, sampled while the run trained
        metric_keys = {m["key"] for m in run["data"]["metrics"]}
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= metric_keys
