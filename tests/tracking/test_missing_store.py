"""A read from an MLflow store that is not there (a model URI, a parent run's children, a model to
convert) says where it looked and what to pass instead; it never creates an empty store."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.cli import EXIT_USAGE, main
from medseg.errors import UsageError
from medseg.tracking.sqlite_store import require_existing_store

RUN_ID = "0123456789abcdef0123456789abcdef"


def _everything_under(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*"))


def test_a_missing_sqlite_store_is_named_by_its_absolute_path_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UsageError, match=rf"--model runs:/{RUN_ID}/model: the MLflow store is not there.*"
                                         rf"Expected: an existing SQLite store at sqlite:///runs/mlflow\.db\. "
                                         rf"Got: no file at {tmp_path}/runs/mlflow\.db \(a relative sqlite:/// path "
                                         rf"starts at the current folder.*Fix: pass --tracking-uri"):
        require_existing_store("sqlite:///runs/mlflow.db", f"--model runs:/{RUN_ID}/model")
    assert _everything_under(tmp_path) == []


def test_an_existing_store_and_other_kinds_of_store_pass(tmp_path: Path) -> None:
    database = tmp_path / "mlflow.db"
    database.write_bytes(b"")
    require_existing_store(f"sqlite:///{database}", "read")
    for uri in ("http://127.0.0.1:5000", "databricks", "sqlite:///:memory:"):
        require_existing_store(uri, "read")  # nothing medseg can check on disk


@pytest.mark.parametrize("argv", [
    ["predict", "--model", f"runs:/{RUN_ID}/model", "-i", "scans", "-o", "masks"],
    ["predict", "--model", f"runs:/{RUN_ID}", "-i", "scans", "-o", "masks"],  # a seeds/folds parent run
    ["predict", "--model", "models:/hippocampus@champion", "-i", "scans", "-o", "masks",
     "--tracking-uri", "sqlite:///elsewhere/mlflow.db"],
    ["model", "check", f"runs:/{RUN_ID}/model"],
    ["export", f"runs:/{RUN_ID}/model", "--out", "exported"],
], ids=["predict-run-model", "predict-parent-run", "predict-registered", "model-check", "export"])
def test_reading_commands_refuse_a_missing_store_and_write_nothing(
        argv: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == EXIT_USAGE
    error = capsys.readouterr().err
    assert "the MLflow store is not there" in error and "Expected:" in error and "Fix:" in error
    assert _everything_under(tmp_path) == []
