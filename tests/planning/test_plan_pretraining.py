"""`medseg plan --unlabelled`: a plan that pretrains on unlabelled scans writes both stages, and
`medseg run` on it pretrains, then fine-tunes from the weights, within the one budget."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import nibabel as nib
import pytest
import yaml
from mlflow.tracking import MlflowClient

import medseg
from medseg.cli import main
from medseg.data.manifest import read_manifest
from medseg.errors import UsageError
from medseg.tasks.registry import get_task
from tests.conftest import make_case, write_msd_dataset

BUDGET_MINUTES = 0.2


def unlabelled_scans(folder: Path, count: int) -> Path:
    """Scans without labels on oblique grids, of odd sizes, some in a subfolder."""
    for i in range(count):
        image, _, affine = make_case((25 + i % 3, 33, 21), seed=50 + i)
        path = folder / ("more" if i % 2 else "") / f"scan_{i}.nii.gz"
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), path)
    return folder


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe's answer without its 60 s: the budget buys 60,000 steps, of which the fine-tuning needs
    20,000 (too few for a 4-fold ensemble's members: one model) and pretraining may take half."""
    task = get_task("segmentation")
    planner = task.plan

    def plan_with_steps(request: Any, fingerprint: Any) -> Any:
        planned = planner(request, fingerprint)
        planned.steps_in_budget = 60_000
        return planned

    monkeypatch.setattr(task, "plan", plan_with_steps)


def _plan(tmp_path: Path, unlabelled: int, labelled: int = 4, out: Path | None = None) -> Any:
    dataset = write_msd_dataset(tmp_path / "labelled", n_cases=labelled, shape=(27, 33, 21))
    return medseg.plan(dataset, budget=f"{BUDGET_MINUTES}m", probe=False, progress=False, home=tmp_path / "home",
                       out=out, unlabelled=unlabelled_scans(tmp_path / "scans", unlabelled))


def test_too_few_unlabelled_scans_plan_no_pretraining_and_say_why(tmp_path: Path, probed: None) -> None:
    planned = _plan(tmp_path, unlabelled=7, labelled=4)
    assert planned.pretraining is None and "pretrain" not in planned.config
    assert planned.config["train"]["max_minutes"] == BUDGET_MINUTES
    row = planned.explain_rows[0]
    assert row.setting == "pretraining" and row.medseg == "none" and "7 unlabelled scan(s) beside 4" in row.why


def test_the_plan_pretrains_then_fine_tunes_from_the_weights_within_the_budget(tmp_path: Path, probed: None) -> None:
    out = tmp_path / "home" / "plan.yaml"
    planned = _plan(tmp_path, unlabelled=9, labelled=4, out=out)
    pretraining = planned.pretraining
    assert pretraining is not None and pretraining["model"] == planned.config["model"]
    assert pretraining["patch"]["size"] == planned.config["patch"]["size"]
    minutes = pretraining["train"]["max_minutes"], planned.config["train"]["max_minutes"]
    assert minutes == (0.1, 0.1) and sum(minutes) == BUDGET_MINUTES  # half: 60,000 steps, 20,000 needed
    every = read_manifest(Path(pretraining["data"]["manifest"]))
    assert len(every.cases) == 13 and all(c.label is None for c in every.cases)  # 9 scans + 4 labelled images
    assert planned.explain_rows[0].medseg == f"0.1 of {BUDGET_MINUTES:g} min"
    written = yaml.safe_load(out.read_text())
    stage = out.with_name("plan.pretrain.yaml")
    assert (out.parent / written["pretrain"]).resolve() == stage.resolve() and stage.is_file()
    assert "# pretrain for 50% of the budget" in stage.read_text()

    quick: dict[str, dict[str, Any]] = {"train": {"num_threads": 1, "num_workers": 0},
                                        "tracking": {"system_metrics": False}}
    raw = yaml.safe_load(stage.read_text())
    stage.write_text(yaml.safe_dump({**raw, **{k: {**raw[k], **v} for k, v in quick.items()}}))
    result = medseg.train(out, overrides=["train.num_threads=1", "train.num_workers=0", "validation.overlays=0",
                                          "validation.hd95=false", "tracking.system_metrics=false"], progress=False)
    assert result is not None
    record = json.loads((result.run_dir / "init_from.json").read_text())
    weights = Path(record["init_from"])
    assert weights.name == "pretrained.safetensors" and record["loaded"]
    client = MlflowClient(result.tracking_uri)
    pretrain_run = client.get_run(record["pretraining_run_id"])
    assert pretrain_run.data.tags["medseg.kind"] == "pretraining"
    assert client.get_run(result.run_id).data.tags["medseg.init_from"] == str(weights)
    # the two trainings share the one budget: the pretraining's clock and the fine-tuning's steps (its one
    # closing validation aside: the loop learns a validation's length only after the first, and at a
    # 6-second budget that one is a large share of it)
    pretrained_min = max(m.value for m in client.get_metric_history(pretrain_run.info.run_id, "time/elapsed_min"))
    fine_tuned_min = sum(m.value for m in client.get_metric_history(result.run_id, "time/epoch_train_s")) / 60
    assert pretrained_min + fine_tuned_min <= BUDGET_MINUTES * 1.1, (pretrained_min, fine_tuned_min)


def test_a_network_pretraining_cannot_train_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    task = get_task("segmentation")
    planner = task.plan

    def resnet_plan(request: Any, fingerprint: Any) -> Any:
        planned = planner(request, fingerprint)
        planned.config["model"]["name"] = "resnet18"
        return planned

    monkeypatch.setattr(task, "plan", resnet_plan)
    with pytest.raises(UsageError, match=r"--unlabelled .*the planner budgets pretraining for segmentation U-Nets "
                                         r"\(unet, dynunet\).*'resnet18'; plan without --unlabelled \(a classification "
                                         r"network is pretrained by `medseg pretrain`"):
        _plan(tmp_path, unlabelled=9)


def test_the_cli_explains_the_decision(tmp_path: Path, probed: None, capsys: pytest.CaptureFixture[str]) -> None:
    dataset = write_msd_dataset(tmp_path / "labelled", n_cases=4, shape=(27, 33, 21))
    scans = unlabelled_scans(tmp_path / "scans", 9)
    out = tmp_path / "home" / "plan.yaml"
    assert main(["plan", str(dataset), "--budget", "2h", "--no-probe", "--no-progress", "--unlabelled", str(scans),
                 "--out", str(out), "--explain"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"\npretraining +60 of 120 min +none \(nnU-Net trains from scratch\) +pretrain for 50% of the "
                     r"budget \(~30,000 steps\): 9 unlabelled scan\(s\) beside 4 labelled", printed)
    assert re.search(r"\ntraining length +60 min after 60 min of pretraining", printed)
    assert f"pretraining: {out.with_name('plan.pretrain.yaml').resolve()}" in printed


def test_a_resumed_fine_tuning_gets_back_the_weights_it_started_from_and_pretrains_nothing(
        tmp_path: Path, probed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "home" / "plan.yaml"
    _plan(tmp_path, unlabelled=9, labelled=4, out=out)
    cfg = medseg.load_config(out)
    run_dir = tmp_path / "stopped_run"
    run_dir.mkdir()
    started = tmp_path / "pretraining" / "pretrained.safetensors"
    (run_dir / "resolved_config.yaml").write_text(yaml.safe_dump({"model": {"init_from": str(started)}}))

    def no_pretraining(**_: Any) -> None:
        raise AssertionError("a resumed run pretrained again")

    monkeypatch.setattr(medseg.api, "pretrain", no_pretraining)
    resumed = medseg.api._pretrained_first(cfg, run_dir, progress=False)
    assert resumed.model.init_from == str(started) and cfg.model.init_from is None
