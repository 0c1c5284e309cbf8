"""The MLflow store's ``<db>.lock`` is never opened through a link."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.errors import RunError
from medseg.tracking.sqlite_store import store_lock


def test_a_link_planted_as_the_store_lock_is_refused_and_its_target_untouched(tmp_path: Path) -> None:
    canary = tmp_path / "precious.txt"
    canary.write_text("keep me\n")
    db = tmp_path / "runs" / "mlflow.db"
    db.parent.mkdir()
    (db.parent / "mlflow.db.lock").symlink_to(canary)
    with pytest.raises(RunError, match=r"mlflow\.db\.lock: the lock file of the MLflow store .* is a symbolic link"):
        with store_lock(db):
            pass
    assert canary.read_text() == "keep me\n"


def test_the_store_lock_is_a_plain_file_that_stays(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    with store_lock(db):
        pass
    with store_lock(db):  # reopened, not refused
        pass
    assert (tmp_path / "mlflow.db.lock").is_file() and not (tmp_path / "mlflow.db.lock").is_symlink()
