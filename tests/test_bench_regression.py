"""``benchmarks/bench_regression.py --tiny``: every arm (direct hippocampus volume regression,
segment-then-measure, RetinaMNIST as regression and as ordinal classification) runs on a few real
cases and writes the JSON keys and Markdown rows the results file is made of."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, require


def test_every_arm_writes_its_scores_and_its_row(tmp_path: Path) -> None:
    require(REPO.parent / "shared" / "data" / "msd_task04_hippocampus")
    require(REPO.parent / "shared" / "data" / "medmnist" / "retinamnist.npz")
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_regression.py"), "--tiny", "--out",
                           str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    arms = json.loads((tmp_path / "regression.json").read_text(encoding="utf-8"))["arms"]
    assert set(arms) == {"hippocampus_regression", "hippocampus_segmentation", "retina_regression",
                         "retina_classification"}
    for name in ("hippocampus_regression", "hippocampus_segmentation"):
        assert arms[name]["cases"] == 2 and all(arms[name][f"mae_ml/{s}"] >= 0 for s in ("anterior", "posterior"))
    assert arms["retina_regression"]["cases"] == 8
    for name in ("retina_regression", "retina_classification"):
        assert 0 <= arms[name]["acc"] <= 1 and arms[name]["mae"] >= 0 and arms[name]["qwk"] is not None
    table = (tmp_path / "regression.md").read_text(encoding="utf-8")
    assert "The host was shared" in table
    assert all(f"| {name} |" in table for name in arms)
