"""The shared evaluate stage: the checkpoint loaded as predict loads it, the split's files written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

import medseg
from medseg.engine.checkpoint import save_checkpoint
from medseg.engine.evaluation import SplitScores, load_for_evaluation, write_evaluation
from medseg.tasks.segmentation.training import build_network
from tests.conftest import tiny_config


def test_the_network_is_evaluated_as_predict_runs_it(tmp_path: Path, tiny_run_inputs: tuple[Path, Path]) -> None:
    dataset, manifest = tiny_run_inputs
    cfg = medseg.load_config(tiny_config(tmp_path, dataset, manifest, f"sqlite:///{tmp_path / 'm.db'}"))
    torch.manual_seed(3)
    trained = build_network(cfg)
    with torch.no_grad():  # batch norms with statistics of their own, so folding them changes the weights
        for module in trained.modules():
            if isinstance(module, torch.nn.BatchNorm3d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    checkpoint = save_checkpoint(tmp_path / "best.safetensors", {"model": trained.state_dict()})

    network, device, amp_dtype = load_for_evaluation(lambda: build_network(cfg), cfg, checkpoint)

    assert device == torch.device("cpu") and amp_dtype is None and not network.training
    assert not any(isinstance(m, torch.nn.BatchNorm3d) for m in network.modules())  # folded, as predict does
    x = torch.randn(1, 1, 16, 16, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(network(x), trained.eval()(x), atol=1e-4)


def test_a_split_writes_its_rows_and_metrics_and_none_without_rows(tmp_path: Path) -> None:
    rows = [{"case_id": "a", "dice": 0.5}, {"case_id": "=b", "dice": 0.25}]
    out = write_evaluation(SplitScores({"test/dice": 0.375}, ["case_id", "dice"], rows), tmp_path, "test", None)

    assert json.loads(out.metrics_file.read_text()) == {"test/dice": 0.375}
    with open(out.per_case, newline="") as fh:
        assert [r["dice"] for r in csv.DictReader(fh)] == ["0.5", "0.25"]
    bare = write_evaluation(SplitScores({"val/loss": 1.0}), tmp_path, "val", None)
    assert not bare.per_case.exists() and bare.metrics == {"val/loss": 1.0}


@pytest.mark.parametrize("stage", ["train", "evaluate", "package"])
def test_the_toy_plugin_inherits_every_stage(stage: str) -> None:
    import sys

    from tests.conftest import REPO

    sys.path.insert(0, str(REPO / "tests" / "plugin_task"))
    try:
        from medseg_toy_task import TASK  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "tests" / "plugin_task"))
    from medseg.tasks.base import TaskBase

    assert getattr(type(TASK), stage) is getattr(TaskBase, stage)
