"""The examples run as a user would run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO


def test_train_and_predict_example_trains_predicts_and_plots(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "examples/train_and_predict.py", "--epochs", "1", "--out", str(tmp_path),
                           "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "hippocampus_001.nii.gz: mask (" in done.stdout and "volumes (mL) anterior" in done.stdout
    figure = tmp_path / "prediction.png"
    assert figure.is_file() and figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
