"""benchmarks/profile_train.py: the stage clock splits each optimiser step into data, forward, loss +
backward and step (known answers on a toy loop), and a tiny run profiles both W4 loops."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

from tests.conftest import REPO, require
from tests.test_benchmarks import _bench


def _profile_train() -> ModuleType:
    return _bench("profile_train")


class SlowLoss(torch.nn.Module):
    """A parameterless module (as MONAI's losses are): its time is the loss's, not the network's."""

    def forward(self, out: torch.Tensor) -> torch.Tensor:
        time.sleep(0.03)
        return out.square().mean()


def test_each_step_is_split_into_data_forward_loss_backward_and_step() -> None:
    profile = _profile_train()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))  # nested modules
    loss_fn, optimiser = SlowLoss(), torch.optim.SGD(net.parameters(), lr=0.1)
    clock = profile.StageClock().install()
    try:
        for _ in range(4):
            time.sleep(0.02)  # the loader's wait
            optimiser.zero_grad()
            loss_fn(net(torch.randn(2, 5))).backward()
            optimiser.step()
    finally:
        clock.remove()
    net(torch.randn(1, 5))  # after remove(): not timed
    assert len(clock.steps) == 4
    for step in clock.steps[1:]:  # the first step has no step before it to measure its data from
        assert step["data"] >= 0.02 and step["loss_backward"] >= 0.03
        assert step["forward"] < 0.03 and step["step"] < 0.03  # the loss's sleep is not the network's
    assert clock.steps[0]["data"] == 0.0
    per = profile.per_epoch(clock.steps, 2)
    assert per["steps_per_epoch"] == 2
    assert per["data"] == pytest.approx(clock.steps[2]["data"] + clock.steps[3]["data"])  # epoch 1 left out
    with pytest.raises(SystemExit, match="the same number of optimiser steps in each of 3 epochs"):
        profile.per_epoch(clock.steps, 3)


def test_a_tiny_run_profiles_both_loops_and_bounds_the_ratio_by_medseg_compute(tmp_path: Path) -> None:
    require(REPO.parent / "shared" / "data" / "msd_task04_hippocampus")
    profile = _profile_train()
    profile.main(["--tiny", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")])
    report = json.loads((tmp_path / "out" / "train_stages.json").read_text(encoding="utf-8"))
    summary = report["summary"]
    for path in ("plain", "medseg"):
        row = summary[path]
        assert all(row[stage] > 0 for stage in ("data", "forward", "loss_backward", "step")), (path, row)
        assert row["cycle"] == pytest.approx(sum(row[s] for s in ("data", "forward", "loss_backward", "step")))
        assert len(report["runs"][path]) == 1 and len(report["runs"][path][0]["epoch_s"]) == 2
    assert summary["bound"] == pytest.approx(summary["plain"]["cycle"] / summary["medseg"]["compute"])
    assert summary["bound"] > summary["ratio"]  # medseg's data stage is never free
    page = (tmp_path / "out" / "train_stages.md").read_text(encoding="utf-8")
    rows = [line for line in page.splitlines() if line.startswith("| ")]  # the header, 5 stage rows, 2 epoch rows
    assert len(rows) == 8 and "**What bounds the ratio:**" in page and "profile_train.py --tiny" in page
