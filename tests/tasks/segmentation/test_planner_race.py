"""The segmentation planner leaves the next richer network open when it nearly reaches the steps
goal: the rules' pick and that one become race candidates (timings made up, so the answer is known)."""

from __future__ import annotations

from pathlib import Path

import pytest

import medseg
from medseg.planning.probe import ProbeResult, with_overrides
from medseg.tasks.registry import validate_config
from medseg.tasks.segmentation import planner
from tests.conftest import write_msd_dataset

#: Made-up step times by candidate label: the budget rule's pick is the first fitting 20,000 steps.
FULL, SMALLER, SMALLEST = "lean U-Net, 16 base features", "0.8x patch", "0.6x patch"


def _fake_timings(seconds: dict[str, float]):
    def time_steps(task, cfg, batch, device, precision, channels_last, name, clock) -> ProbeResult:
        key = next((k for k in (SMALLEST, SMALLER) if k in name), FULL if "lean" in name else "dynunet")
        value = seconds[key] * (1.0 if str(precision) == "fp32" else 0.95)  # reduced precision: not clearly faster
        return ProbeResult(name, str(precision), channels_last, value, None)
    return time_steps


@pytest.fixture
def msd(tmp_path: Path) -> Path:
    return write_msd_dataset(tmp_path / "msd", n_cases=6, shape=(48, 56, 44))


def _plan(msd: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seconds: dict[str, float], budget: str):
    monkeypatch.setattr(planner, "time_steps", _fake_timings(seconds))
    return medseg.plan(msd, budget=budget, manifest=tmp_path / "m.csv", progress=False)


def test_a_richer_network_near_the_goal_is_raced_against_the_rules_pick(msd: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    # 15 min x 0.55 = 495 s of steps: 0.6x patch 24,750 steps (the pick), 0.8x 12,375 (>= half the goal)
    planned = _plan(msd, tmp_path, monkeypatch, {SMALLEST: 0.02, SMALLER: 0.04, FULL: 0.2, "dynunet": 1.0}, "15m")

    assert len(planned.candidates) == 2
    rules, richer = planned.candidates
    assert rules.overrides == {} and SMALLEST in rules.description
    assert richer.overrides["patch.size"] != planned.config["patch"]["size"]
    assert richer.overrides["train.precision"] == "fp32" and "12,375 steps" in richer.description
    assert rules.name.startswith("unet16-") and richer.name.startswith("unet16-")
    raced_config = validate_config(with_overrides(planned.config, richer.overrides))
    assert list(raced_config.patch.size) == richer.overrides["patch.size"]


def test_no_topology_race_when_the_richer_network_is_far_from_the_goal(msd: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    # 0.8x patch: 495 / 0.06 = 8,250 steps, under half the goal
    planned = _plan(msd, tmp_path, monkeypatch, {SMALLEST: 0.02, SMALLER: 0.06, FULL: 0.2, "dynunet": 1.0}, "15m")

    assert planned.candidates == []
