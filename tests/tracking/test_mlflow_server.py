"""A real ``mlflow server`` process on localhost: a pipeline run logs to it over HTTP."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg
from tests.conftest import free_port, tiny_config, train_run, wait_until_answering


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_answering(f"{url}/health", proc, 90, tmp_path / "server.log", "mlflow server")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_pipeline_logs_a_run_and_model_to_a_real_server(tmp_path: Path, tiny_run_inputs, mlflow_server: str) -> None:
    dataset, manifest = tiny_run_inputs
    config = tiny_config(tmp_path, dataset, manifest, mlflow_server, train={"max_epochs": 1})
    result = train_run(config)
    assert result.model_uri
    assert result.tracking_uri == mlflow_server

    client = MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert "val/dice/blob1" in run.data.metrics and "train/loss" in run.data.metrics
    assert run.data.params["tracking.uri"] == mlflow_server
    # the artifacts went through the server into its own artifact store, not a local folder
    stored = list((tmp_path / "server-artifacts").rglob("resolved_config.yaml"))
    assert stored, "artifacts were not proxied to the server's artifact destination"

    mlflow.set_tracking_uri(mlflow_server)
    model = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=mlflow_server).model.networks[0]
    with torch.no_grad():
        assert model(torch.randn(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)
