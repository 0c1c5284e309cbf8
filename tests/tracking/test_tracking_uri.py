"""Summaries name their MLflow store so that it can be found from any folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.tracking.mlflow_tracker import absolute_tracking_uri


def test_a_relative_sqlite_store_is_written_as_an_absolute_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert absolute_tracking_uri("sqlite:///runs/mlflow.db") == f"sqlite:///{tmp_path.resolve()}/runs/mlflow.db"
    assert absolute_tracking_uri("sqlite:////srv/mlflow.db") == "sqlite:////srv/mlflow.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert not (tmp_path / "runs").exists()  # naming the store creates nothing
