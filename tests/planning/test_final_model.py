"""The final training a plan chooses: nnU-Net's fold ensemble when every member still reaches the
step goal in its share of the budget, else one model on every case."""

from __future__ import annotations

from pathlib import Path

import pytest

import medseg
from medseg.planning.final_model import choose_final_training
from tests.conftest import write_msd_dataset


def test_an_ensemble_only_when_each_member_still_reaches_the_step_goal() -> None:
    ensemble = choose_final_training(5, 100_000, 20_000)
    assert ensemble.ensemble and ensemble.folds == 5 and ensemble.steps_each == 20_000
    assert "5-fold ensemble" in ensemble.why and "~20,000 steps" in ensemble.why
    short = choose_final_training(5, 99_999, 20_000)  # one step short: each member would get 19,999
    assert not short.ensemble and short.folds is None and short.steps_each == 99_999
    assert "~19,999, below the 20,000" in short.why
    assert choose_final_training(3, 61_000, 20_000).folds == 3
    unprobed = choose_final_training(5, None, 20_000)
    assert not unprobed.ensemble and "no probe" in unprobed.why
    assert not choose_final_training(5, 10**9, None).ensemble  # a planner without a goal keeps one model


def test_a_budget_that_buys_every_member_its_steps_plans_a_fold_ensemble_sharing_it(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "six", n_cases=6, shape=(19, 23, 17))
    planned = medseg.plan(root, budget="10m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    assert planned.config["data"]["train_folds"] == "all" and "folds" not in planned.config["train"]
    assert "train.folds" not in planned.why and planned.ensemble_folds is None  # no probe: one model
    # the same plan, as if the probe had measured 100,000 steps in the budget
    planned.config["data"].pop("fold")
    planned.config["data"].pop("train_folds")
    planned.steps_in_budget, planned.step_goal = 100_000, 20_000
    planned.train_on_every_case(5, 2, calibrates=True)
    train, data = planned.config["train"], planned.config["data"]
    assert train["folds"] == 5 and planned.ensemble_folds == 5
    assert train["max_minutes"] == pytest.approx(2.0)  # each member's share of the 10 minutes
    assert data["fold"] == 0 and data["train_folds"] == "others"  # each member holds its own fold out
    assert "5-fold ensemble" in planned.why["train.folds"] and "2.0 min each" in planned.why["train.max_minutes"]
    assert planned.explain_rows[0].medseg == "5-fold ensemble of all 6"
    cfg = medseg.validate_config(planned.config)
    assert cfg.train.folds == 5 and cfg.train.max_minutes == pytest.approx(2.0)
    planned.set_budget(7.5)  # what a race leaves: shared again
    assert planned.config["train"]["max_minutes"] == pytest.approx(1.5)
