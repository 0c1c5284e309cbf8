"""The tracker on a local SQLite store: resumed runs log nothing twice, parents and children."""

from __future__ import annotations

from pathlib import Path

import pytest

from medseg.engine.predict import expand_model_refs
from medseg.errors import UsageError
from medseg.tracking import MlflowTracker, NullTracker


def test_a_resumed_run_skips_points_already_logged_but_keeps_new_values(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = MlflowTracker(uri, "tests")
    run_id = first.start("r", {})
    first.log_metrics({"train/loss": 0.5, "test/dice_mean": 0.7}, step=1)
    first.log_metrics({"test/dice_mean": 0.7}, step=0)

    resumed = MlflowTracker(uri, "tests")
    assert resumed.start(None, {}, run_id=run_id) == run_id
    resumed.log_metrics({"train/loss": 0.5}, step=1)  # replayed epoch: already there
    resumed.log_metrics({"train/loss": 0.4}, step=2)  # new epoch
    resumed.log_metrics({"test/dice_mean": 0.8}, step=0)  # re-evaluated after more training: a new value
    resumed.log_metrics({"test/dice_mean": 0.8}, step=0)  # and only once
    history = {k: [(m.step, m.value) for m in resumed.client.get_metric_history(run_id, k)]
               for k in ("train/loss", "test/dice_mean")}
    assert history["train/loss"] == [(1, 0.5), (2, 0.4)]
    assert sorted(history["test/dice_mean"]) == [(0, 0.7), (0, 0.8), (1, 0.7)]
    assert resumed.client.get_run(run_id).data.metrics["test/dice_mean"] == 0.7  # step 1 is the latest step


def test_child_runs_nest_under_their_parent(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tests")
    parent = tracker.start("parent", {})
    child = MlflowTracker(uri, "tests").start("child", {}, parent_run_id=parent)
    assert tracker.client.get_run(child).data.tags["mlflow.parentRunId"] == parent


def test_an_unfinished_parent_is_not_an_ensemble_yet(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    tracker = MlflowTracker(uri, "tests")
    parent = tracker.start("parent", {"medseg.repeat": "folds", "medseg.repeat_count": "5", "run_dir": "runs/x"})
    with pytest.raises(UsageError, match=r"0 of 5 child models exist .* --resume runs/x --folds 5"):
        expand_model_refs([f"runs:/{parent}"])
    plain = tracker.start("plain", {})
    assert expand_model_refs([f"runs:/{plain}"]) == [f"runs:/{plain}"]  # not a parent: left to the loader


def test_the_null_tracker_touches_no_store(tmp_path: Path) -> None:
    null = NullTracker(f"sqlite:///{tmp_path / 'never.db'}")
    null.start("x", {})
    null.log_metrics({"a": 1.0}, step=0)
    null.end()
    assert not (tmp_path / "never.db").exists()
