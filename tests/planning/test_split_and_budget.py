"""nnU-Net's split policy (every training case in k folds, the final model on all of them, a test
split only where the data have one) and budgets that bind (no epoch cap, the schedule follows the
clock, training ends on time)."""

from __future__ import annotations

import csv
import logging
from collections import Counter
from pathlib import Path

import pytest
from pydantic import ValidationError

import medseg
from medseg.config import TrainConfig
from medseg.data.build import default_folds, with_folds
from medseg.data.manifest import Case, Manifest, read_manifest
from medseg.engine.loop import BudgetSchedule, split_cases
from medseg.errors import ConfigError
from tests.conftest import write_msd_dataset


def _case(i: int, split: str = "", fold: int | None = None, subject: str | None = None) -> Case:
    return Case(case_id=f"c{i}", images=(f"c{i}.nii.gz",), label=f"l{i}.nii.gz", split=split, fold=fold,
                subject_id=subject)


def test_five_folds_or_one_per_subject_and_none_below_two() -> None:
    assert default_folds([_case(i) for i in range(40)]) == 5
    assert default_folds([_case(i) for i in range(4)]) == 4
    assert default_folds([_case(i, subject="s") for i in range(4)]) is None  # one subject: nothing to hold out
    # a layout's own test split is not folded: three training cases give three folds
    assert default_folds([*(_case(i, "train") for i in range(3)), *(_case(i + 3, "test") for i in range(9))]) == 3


def test_with_folds_keeps_the_test_split_and_folds_every_other_case(tmp_path: Path) -> None:
    cases = (*(_case(i, "train") for i in range(7)), *(_case(i + 7, "val") for i in range(3)),
             *(_case(i + 10, "test") for i in range(2)))
    folded = with_folds(Manifest(path=tmp_path / "a.csv", cases=cases), tmp_path / "b.csv", folds=5)
    again = read_manifest(tmp_path / "b.csv")
    assert [c.case_id for c in again.cases] == [c.case_id for c in folded.cases]
    assert Counter(c.split for c in again.cases) == {"train": 10, "test": 2}
    assert sorted(Counter(c.fold for c in again.cases if c.split == "train").values()) == [2, 2, 2, 2, 2]
    assert {c.fold for c in again.cases if c.split == "test"} == {-1}


def test_a_plan_on_a_folder_trains_on_every_case_with_fold_0_monitored(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "six", n_cases=6)
    planned = medseg.plan(root, budget="5m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    manifest = read_manifest(tmp_path / "m.csv")
    assert Counter(c.split for c in manifest.cases) == {"train": 6}  # no test case carved out of 6
    assert sorted({c.fold for c in manifest.cases}) == [0, 1, 2, 3, 4]
    data = planned.config["data"]
    assert data["fold"] == 0 and data["train_folds"] == "all"
    assert planned.config["validation"]["calibrate"] is False  # the validation fold is seen in training
    assert planned.explain_rows[0].setting == "training cases" and "all 6" in planned.explain_rows[0].medseg
    cfg = medseg.validate_config(planned.config)
    assert len(split_cases(cfg, manifest, "train")) == 6 and len(split_cases(cfg, manifest, "val")) == 2
    assert planned.config["train"]["max_epochs"] is None  # the budget binds, never an epoch cap
    assert "no epoch cap" in planned.why["train.max_epochs"]


def test_train_folds_all_needs_a_fold_and_a_budget_needs_something_to_end_it(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "six", n_cases=4)
    raw = medseg.plan(root, budget="5m", manifest=tmp_path / "m.csv", probe=False, progress=False).config
    raw["data"]["fold"] = None
    with pytest.raises(ConfigError, match="needs data.fold"):
        medseg.validate_config(raw)
    with pytest.raises(ValidationError, match="nothing would end training"):
        TrainConfig(max_epochs=None, max_minutes=None)
    with pytest.raises(ValidationError, match="deterministic follows steps"):
        TrainConfig(max_epochs=None, max_minutes=5, deterministic=True)


def test_without_an_epoch_cap_the_lr_schedule_follows_the_clock() -> None:
    cfg = medseg.validate_config({"task": "segmentation", "data": {"manifest": "m.csv", "labels": {0: "bg", 1: "fg"}},
                                  "patch": {"size": [16, 16, 16]}, "train": {"max_epochs": None, "max_minutes": 2}})
    schedule = BudgetSchedule(cfg, iterations_per_epoch=10)
    schedule.step_count = 10_000  # steps say nothing without a cap
    schedule.elapsed = 30.0
    assert schedule.progress() == pytest.approx(0.25)
    schedule.elapsed = 120.0
    assert schedule.progress() == 1.0 and schedule.factor() == pytest.approx(cfg.optim.min_lr_fraction)


def test_a_planned_run_on_a_tiny_dataset_stops_at_the_first_budget_check_past_its_budget(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The stopping logic, read from the run's own epoch records, not a wall-clock tolerance (which a
    loaded host breaks): the budget alone ends the run, every epoch before the last trained within
    the budget, and the last one started before the budget or stopped at its first step's check."""
    root = write_msd_dataset(tmp_path / "tiny", n_cases=5, shape=(21, 19, 17))
    # 12 s: a few epochs of these cases, each validated, so the closing validation must be foreseen
    planned = medseg.plan(root, budget="12s", manifest=tmp_path / "m.csv", probe=False, progress=False)
    raw = planned.config
    assert raw["train"]["max_epochs"] is None  # no epoch cap: only the clock can end it
    budget_s = raw["train"]["max_minutes"] * 60
    raw["output_dir"] = str(tmp_path / "runs")
    raw["tracking"] = {"uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "budget", "system_metrics": False}
    raw["validation"].update({"hd95": False, "overlays": 0, "tta": False})  # scoring after the budget: not timed here
    raw["train"]["val_interval"] = 1  # the reserve for the closing validation applies from the first epoch
    with caplog.at_level(logging.INFO, logger="medseg"):
        result = medseg.train(medseg.validate_config(raw), progress=False)
    assert f"wall-clock budget of {raw['train']['max_minutes']:.1f} min reached after" in caplog.text  # the budget ended it
    with open(result.run_dir / "history.csv", newline="") as f:
        history = list(csv.DictReader(f))
    assert len(history) == result.metrics["train/epochs"] >= 2  # a validation before the last foresaw it
    ends = [float(r["time/elapsed_min"]) * 60 for r in history]  # seconds since training started
    starts = [0.0, *ends[:-1]]  # an epoch starts after the previous one's validation and checkpoint
    trained = [s + float(r["time/epoch_train_s"]) for s, r in zip(starts, history)]
    # an epoch whose training reached the budget would have been cut there and been the last
    assert all(t < budget_s for t in trained[:-1]), (trained, budget_s)
    # the last started within the budget, or (a validation ran past it) was stopped by its first check
    assert starts[-1] < budget_s or history[-1]["time/epoch_steps"] == "1", (starts, history[-1])
    assert result.metrics["train/minutes"] == pytest.approx(ends[-1] / 60, rel=1e-4)


def test_labelled_test_folders_are_the_test_split_and_only_the_training_folder_is_folded(tmp_path: Path) -> None:
    import json
    import shutil

    root = write_msd_dataset(tmp_path / "msd", n_cases=6, shape=(21, 19, 17))
    for folder in ("imagesTs", "labelsTs"):
        (root / folder).mkdir()
    for i in (4, 5):  # two cases move to the test folders, as nnU-Net lays them out
        shutil.move(root / "imagesTr" / f"case_{i:03d}.nii.gz", root / "imagesTs" / f"case_{i:03d}.nii.gz")
        shutil.move(root / "labelsTr" / f"case_{i:03d}.nii.gz", root / "labelsTs" / f"case_{i:03d}.nii.gz")
    info = json.loads((root / "dataset.json").read_text())
    info["training"] = info["training"][:4]
    (root / "dataset.json").write_text(json.dumps(info))
    assert "test 2" in medseg.detect_layout(root).describe()
    planned = medseg.plan(root, budget="5m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    manifest = read_manifest(tmp_path / "m.csv")
    assert {c.case_id for c in manifest.cases if c.split == "test"} == {"case_004", "case_005"}
    assert sorted(c.fold for c in manifest.cases if c.split == "train") == [0, 1, 2, 3]  # 4 cases: 4 folds
    assert planned.config["data"]["train_folds"] == "all"
