"""benchmarks/bench_pretrain_classification.py --tiny: one pretraining of the classifier's ResNet-18 whose
encoder every pretrained arm loads (its head fresh), both arms per case count, and the table built from
them. (Its own file, beside tests/test_benchmarks.py; like bench_pretrain it is run by hand, not by a
`make bench*` target.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, require


@pytest.mark.slow
def test_bench_pretrain_classification_tiny_pretrains_once_and_scores_both_arms(tmp_path: Path) -> None:
    require(REPO / "data_manifests" / "medmnist_pneumonia.csv")
    require(REPO / "data" / "pneumoniamnist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MLFLOW_ENABLE_ASYNC_LOGGING": "false"}
    done = subprocess.run([sys.executable, "bench_pretrain_classification.py", "--tiny", "--out", str(tmp_path)],
                          cwd=REPO / "benchmarks", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "pretrain_classification.json").read_text(encoding="utf-8"))
    assert {"arms", "pretraining", "host", "command", "widen", "commit"} <= set(report)
    pre = report["pretraining"]
    assert pre["images"] == 16 and pre["tensors"] > 0 and pre["epochs"] == 1 and Path(pre["weights"]).is_file()
    assert set(report["arms"]) == {f"{arm}/{cases}" for arm in ("scratch", "pretrained") for cases in ("6", "all")}
    for name, entry in report["arms"].items():
        assert entry["cases"] == (6 if name.endswith("/6") else 12), name
        assert 0 <= entry["test_auc"] <= 1 and 0 <= entry["test_acc"] <= 1, name
        pretrained = name.startswith("pretrained")
        assert (entry["loaded_tensors"] == pre["tensors"]) == pretrained, name
        assert (entry["fresh_tensors"] == ["fc.1.bias", "fc.1.weight"]) == pretrained, name  # the head alone
    text = (tmp_path / "pretrain_classification.md").read_text(encoding="utf-8")
    rows = [line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    assert rows[1:] == ["6", "12"]
    assert "The host was shared" in text and "bench_pretrain_classification.py --tiny" in text
    rendered = subprocess.run([sys.executable, "bench_pretrain_classification.py", "--tiny", "--out", str(tmp_path),
                               "--render", "--note", "Not met: one seed only."], cwd=REPO / "benchmarks", env=env,
                              capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr[-3000:]
    again = (tmp_path / "pretrain_classification.md").read_text(encoding="utf-8")
    assert "Not met: one seed only." not in text and "\n\nNot met: one seed only.\n\n" in again
