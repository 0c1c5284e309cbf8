"""The issue's quality bar on real data: 30 minutes of 2-core CPU training on MSD Hippocampus.

Slow (about 35 minutes): run with `pytest -m slow`. The figure it checks is on the 52 held-out
test cases, scored once with the checkpoint chosen on the 26 validation cases.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from medseg.cli import main

from ..conftest import HIPPO, REPO, require


@pytest.mark.slow
def test_msd_hippocampus_30_minutes_reaches_dice_085_on_the_test_split(tmp_path: Path, monkeypatch, capsys) -> None:
    require(HIPPO)
    monkeypatch.chdir(REPO)
    code = main(["run", "configs/msd_hippocampus.yaml", "--no-progress", "--set", "train.max_minutes=30",
                 "--set", f"data.root={HIPPO}", "--set", f"output_dir={tmp_path / 'runs'}",
                 "--set", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    assert code == 0
    summary_path = Path(capsys.readouterr().out.strip().splitlines()[-1].removeprefix("summary: "))
    metrics = json.loads(summary_path.read_text())["metrics"]
    assert metrics["train/minutes"] <= 30.5
    assert metrics["test/dice_mean"] >= 0.85, metrics
    assert metrics["test/dice/anterior"] >= 0.80 and metrics["test/dice/posterior"] >= 0.80
