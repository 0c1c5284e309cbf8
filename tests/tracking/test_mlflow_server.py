"""A real ``mlflow server`` process on localhost: a pipeline run logs to it over HTTP."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

import medseg
from tests.conftest import tiny_config, train_run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[str]:
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    try:
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
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
