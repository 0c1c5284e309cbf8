"""The race: successive halving between the candidates a plan leaves open, on a held-out fold,
inside the budget, every run an MLflow child of one ``race`` run."""

from __future__ import annotations

from pathlib import Path

import pytest

import medseg
from medseg.planning.plan import Candidate
from medseg.planning.race import NO_TEST_SPLIT, combine_candidates, race_config, raceable, rung_minutes
from tests.conftest import write_msd_dataset


def test_successive_halving_gives_each_rung_an_equal_share_and_halves_the_field() -> None:
    assert rung_minutes(1, 10) == []
    assert rung_minutes(2, 10) == [(2, 5.0)]
    assert rung_minutes(4, 12) == [(4, 1.5), (2, 3.0)]
    assert [n for n, _ in rung_minutes(5, 30)] == [5, 3, 2]
    assert sum(n * m for n, m in rung_minutes(5, 30)) == pytest.approx(30)


def test_a_race_run_holds_fold_0_out_and_never_sees_a_test_split(tmp_path: Path) -> None:
    base = {"data": {"fold": 0, "train_folds": "all"}, "train": {"max_epochs": None, "max_minutes": 20},
            "validation": {"hd95": True, "overlays": 4, "calibrate": False}, "tracking": {"run_name": "x"}}
    raw = race_config(base, Candidate("wide", "", {"model.channels": [32, 64]}), 2.5, tmp_path)
    assert raw["data"] == {"fold": 0, "train_folds": "others", "test_split": NO_TEST_SPLIT}
    assert raw["train"]["max_minutes"] == 2.5 and raw["model"]["channels"] == [32, 64]
    assert raw["validation"] == {"hd95": False, "overlays": 0, "calibrate": False}
    assert base["data"]["train_folds"] == "all"  # the plan itself is untouched


def test_a_plan_with_two_candidates_races_and_the_winner_gets_the_rest_of_the_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_msd_dataset(tmp_path / "five", n_cases=5, shape=(21, 19, 17))
    planned = medseg.plan(root, budget="1.2m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    planned.config["tracking"]["uri"] = f"sqlite:///{tmp_path}/mlflow.db"
    planned.config["validation"].update({"hd95": False, "overlays": 0})
    planned.candidates = [Candidate("rules", "the rules' choice"),
                          Candidate("broken", "a network that cannot be built", {"model.channels": [4]},
                                    {"model.channels": "raced"})]
    result = medseg.race_plan(planned, progress=False, min_run_minutes=0.05)
    assert result is not None and result.winner.name == "rules"  # the broken candidate fails and is out
    assert {e.candidate for e in result.entries} == {"rules", "broken"}
    assert [e.score is None for e in result.entries] == [False, True]
    assert planned.config["train"]["max_minutes"] == pytest.approx(1.2 - result.minutes_used, abs=0.02)
    assert "race (successive halving" in " ".join(planned.notes) and planned.race["winner"] == "rules"
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.info.run_name == "race")
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(children) >= 1 and parent.data.tags["medseg.race.winner"] == "rules"
    _the_winner_goes_on_from_its_race_weights(planned, result)


def _the_winner_goes_on_from_its_race_weights(planned, result) -> None:
    import torch

    from medseg.io import safe_tree
    from medseg.tasks.registry import get_task, validate_config

    weights = Path(planned.config["model"]["init_from"])
    raced = next(e for e in result.entries if e.candidate == "rules")
    assert weights == (Path(raced.run_dir) / "checkpoints" / "last.safetensors").resolve() and weights.is_file()
    assert "not lost" in planned.why["model.init_from"] and "starting from its race weights" in planned.notes[-1]
    cfg = validate_config(planned.config)
    network = get_task(planned.task).training_network(cfg)
    saved = safe_tree.load(weights)["model"]
    assert saved and all(torch.equal(network.state_dict()[k], v) for k, v in saved.items())


def test_structure_and_topology_alternatives_pair_up_only_when_every_run_gets_its_time() -> None:
    structure = [Candidate("regions", "r"), Candidate("labels", "l", {"regions": None}, {"loss": "ce"})]
    topology = [Candidate("unet16-20x32x20", "t"), Candidate("unet16-28x40x28", "p", {"patch.size": [28, 40, 28]},
                                                             {"model": "richer"})]
    paired = combine_candidates(structure, topology, race_minutes=12)  # 4 runs of 1.5 min, then 2 of 3
    assert [c.name for c in paired] == ["regions+unet16-20x32x20", "regions+unet16-28x40x28",
                                        "labels+unet16-20x32x20", "labels+unet16-28x40x28"]
    assert paired[0].overrides == {} and paired[3].overrides == {"regions": None, "patch.size": [28, 40, 28]}
    assert paired[3].why_updates == {"loss": "ce", "model": "richer"}
    assert combine_candidates(structure, topology, race_minutes=6) == structure  # 4 runs of 0.75 min: too short
    assert combine_candidates([], topology, race_minutes=6) == topology
    assert combine_candidates([], topology, race_minutes=2) == topology  # listed, and race() says why it cannot
    assert combine_candidates([], [], race_minutes=60) == []
    assert raceable(2, 3.0) and not raceable(2, 2.9) and not raceable(1, 60)


def test_no_race_without_candidates_or_time_and_the_plan_says_why(tmp_path: Path) -> None:
    root = write_msd_dataset(tmp_path / "five", n_cases=5, shape=(21, 19, 17))
    planned = medseg.plan(root, budget="3m", manifest=tmp_path / "m.csv", probe=False, progress=False)
    planned.candidates = [Candidate("a", ""), Candidate("b", "", {"seed": 1})]
    before = dict(planned.config)
    assert medseg.race_plan(planned, progress=False) is None  # 1 min for two candidates: too short
    assert planned.config == before and any("no race" in n and "below 1.5" in n for n in planned.notes)
