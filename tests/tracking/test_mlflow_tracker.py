"""The tracker on a local SQLite store: resumed runs log nothing twice, parents and children, images with
steps, dataset inputs, system metrics and the experiment's kind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medseg.engine.model_loading import expand_model_refs
from medseg.errors import UsageError
from medseg.tracking import MlflowTracker, NullTracker
from medseg.tracking.mlflow_tracker import DatasetRecord


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
    null.log_image("val/overlay/x", np.zeros((4, 4, 3), dtype=np.uint8), step=1)
    null.log_dataset_inputs([DatasetRecord("cases/train", "abc", tmp_path / "cases.csv", "train")])
    null.start_system_metrics(0.1)
    null.end()
    assert not (tmp_path / "never.db").exists()


def test_images_are_logged_with_their_step_and_a_resumed_run_skips_those_it_has(tmp_path: Path) -> None:
    from PIL import Image

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tests")
    run_id = tracker.start("r", {})
    picture = np.zeros((12, 20, 3), dtype=np.uint8)
    picture[:, :10, 0] = 255
    tracker.log_image("val/overlay/case:1", picture, step=1)  # ':' is not allowed in an MLflow key
    png = tmp_path / "p.png"
    Image.fromarray(picture).save(png)
    tracker.log_image("val/overlay/case:1", png, step=2)

    resumed = MlflowTracker(uri, "tests")
    resumed.start(None, {}, run_id=run_id)
    resumed.log_image("val/overlay/case:1", picture, step=2)  # replayed validation: already there
    resumed.log_image("val/overlay/case:1", picture, step=3)
    names = sorted(item.path for item in resumed.client.list_artifacts(run_id, "images") if item.path.endswith(".png"))
    assert [name.split("+")[:3] for name in names] == [["images/val~overlay~case_1", "step", str(step)]
                                                      for step in (1, 2, 3)]
    assert resumed.client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"


def test_dataset_inputs_carry_the_digest_the_context_and_a_profile(tmp_path: Path) -> None:
    import json

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tests")
    run_id = tracker.start("r", {})
    manifest = tmp_path / "cases.csv"
    records = [DatasetRecord(f"cases/{role}", "0123456789abcdef", manifest, role, {"cases": n})
               for role, n in (("train", 4), ("val", 2))]
    tracker.log_dataset_inputs(records)
    tracker.log_dataset_inputs(records)  # a resumed run: nothing twice
    inputs = tracker.client.get_run(run_id).inputs.dataset_inputs
    found = {i.tags[0].value: i.dataset for i in inputs}
    assert sorted(found) == ["train", "val"] and len(inputs) == 2
    assert found["val"].digest == "0123456789abcdef" and found["val"].name == "cases/val"
    assert json.loads(found["val"].source) == {"uri": str(manifest.resolve())}
    assert json.loads(found["train"].profile) == {"cases": 4}


def test_experiments_open_in_the_model_training_view_unless_someone_chose_another(tmp_path: Path) -> None:
    from medseg.tracking.mlflow_tracker import EXPERIMENT_KIND_TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tests")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracker.client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND_TAG, "genai_development")
    again = MlflowTracker(uri, "tests")
    assert again.client.get_experiment(again.experiment_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_system_metrics_are_sampled_until_the_run_ends(tmp_path: Path) -> None:
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tests")
    run_id = tracker.start("r", {})
    tracker.start_system_metrics(interval_s=0.2)
    time.sleep(1.0)
    tracker.end()
    assert tracker._system_metrics is None
    metrics = tracker.client.get_run(run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


def test_the_printed_link_opens_the_run_in_the_model_training_view(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = MlflowTracker(uri, "tests")
    assert tracker.run_page("http://host:5000/") == (f"http://host:5000/#/experiments/{tracker.experiment_id}/runs"
                                                     "?workflowType=machine_learning")
    run_id = tracker.start("r", {})
    hint = tracker.ui_hint()
    assert hint.startswith(f"mlflow ui --backend-store-uri sqlite:///{(tmp_path / 'mlflow.db').resolve()}")
    assert f"http://127.0.0.1:5000/#/experiments/{tracker.experiment_id}/runs/{run_id}" \
           "?workflowType=machine_learning" in hint
