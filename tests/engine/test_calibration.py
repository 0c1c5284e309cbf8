"""Temperature scaling: the fit, the ECE, the region voxels are measured in, and the run's files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.engine.calibration import (
    CALIBRATION_FILE,
    TEMPERATURE_RANGE,
    VoxelSample,
    assess,
    calibrate_split,
    contract_calibration,
    contract_temperature,
    expected_calibration_error,
    fit_temperature,
    region_of_interest,
)


def overconfident_logits(n: int = 20_000, classes: int = 3, true_temperature: float = 2.5,
                         seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits whose labels were drawn from ``softmax(logits / true_temperature)``: a network
    ``true_temperature`` times too sure of itself."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 4.0
    labels = torch.multinomial(torch.softmax(logits / true_temperature, 1), 1, generator=generator)[:, 0]
    return logits, labels


@pytest.mark.parametrize("true_temperature", [0.5, 1.0, 2.5])
def test_the_fit_recovers_the_temperature_the_labels_were_drawn_with(true_temperature: float) -> None:
    logits, labels = overconfident_logits(true_temperature=true_temperature)
    assert fit_temperature(logits, labels) == pytest.approx(true_temperature, rel=0.08)


def test_scaling_lowers_ece_and_nll_and_keeps_every_arg_max() -> None:
    logits, labels = overconfident_logits(true_temperature=2.5)
    report = assess(logits, labels, fit_temperature(logits, labels))
    assert report.ece_after < report.ece_before / 3
    assert report.nll_after < report.nll_before
    assert torch.equal((logits / report.temperature).argmax(1), logits.argmax(1))
    assert report.samples == len(labels)
    assert sum(b["count"] for b in report.table_after) == len(labels)


def test_nothing_to_fit_leaves_the_temperature_at_one() -> None:
    assert fit_temperature(torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)) == 1.0
    assert fit_temperature(torch.ones(5, 1), torch.zeros(5, dtype=torch.long)) == 1.0


def test_nothing_predicted_wrong_keeps_t_1() -> None:
    """Every prediction right: the likelihood keeps rising as T -> 0, so there is no temperature
    to fit; sharpening would make every later mistake look certain."""
    logits = torch.tensor([[0.5, -0.5], [-0.5, 0.5]] * 50)
    labels = torch.tensor([0, 1] * 50)
    assert fit_temperature(logits, labels) == 1.0
    assert fit_temperature(logits[::2], labels[::2]) == 1.0  # one class among the labels
    labels[0] = 1  # one mistake: now there is something to fit, within the range
    assert TEMPERATURE_RANGE[0] <= fit_temperature(logits, labels) < 1.0


def test_ece_by_hand() -> None:
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 0, 1])
    ece, table = expected_calibration_error(probs, labels, bins=10)
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5, weight 1/2; (0.5, 0.6]: 0.6 vs 1, 1/4; (0.6, 0.7]: 0.7 vs 1, 1/4
    assert ece == pytest.approx(0.5 * 0.4 + 0.25 * 0.4 + 0.25 * 0.3)
    assert [b["count"] for b in table if b["count"]] == [1, 1, 2]


def test_the_region_of_interest_is_the_box_around_labelled_or_predicted_structures() -> None:
    labels = torch.zeros(31, 20, 9, dtype=torch.long)
    prediction = torch.zeros_like(labels)
    labels[10:12, 5:7, 4] = 1
    prediction[20, 15, 2] = 2
    box = region_of_interest(labels, prediction, margin=3)
    assert box == (slice(7, 24), slice(2, 19), slice(0, 8))
    assert region_of_interest(torch.zeros_like(labels), torch.zeros_like(labels)) == (slice(None),) * 3


def test_voxel_sample_keeps_at_most_its_limit_per_case_seeded() -> None:
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 17, 13, 11, generator=generator)
    labels = logits.argmax(0)
    first, second = VoxelSample.empty(limit_per_case=500, seed=4), VoxelSample.empty(limit_per_case=500, seed=4)
    for sample in (first, second):
        sample.add_case(logits, labels, labels)
        sample.add_case(logits[:, :2, :2, :2], labels[:2, :2, :2], labels[:2, :2, :2])
    values, truth = first.tensors()
    assert values.shape == (500 + 8, 3) and truth.shape == (508,)
    assert torch.equal(values, second.tensors()[0])  # same seed, same voxels
    # every kept voxel's logits are the voxel's own: its label is their arg-max here
    assert torch.equal(values.argmax(1), truth)


def test_the_validation_split_writes_the_temperature_the_test_split_uses(tmp_path: Path) -> None:
    logits, labels = overconfident_logits(n=4000, true_temperature=2.0)
    val = calibrate_split(True, True, logits[:2000], labels[:2000], tmp_path, "val", "best_val")
    stored = json.loads((tmp_path / CALIBRATION_FILE).read_text())
    assert stored["temperature"] == val.temperature == val.metrics["calibration/temperature"]
    assert stored["fitted_on"] == "val"
    test = calibrate_split(True, False, logits[2000:], labels[2000:], tmp_path, "test", "test")
    assert test.temperature == val.temperature and "calibration/temperature" not in test.metrics
    assert test.metrics["test/ece"] < test.metrics["test/ece_uncalibrated"]  # held out, still better
    assert [p.name for p in test.figures] == ["calibration_test.png", "calibration_test_uncalibrated.png"]
    assert all(p.is_file() for p in (*val.figures, *test.figures))
    assert contract_calibration(tmp_path)["calibration"]["temperature"] == val.temperature


def test_calibration_switched_off_keeps_t_1_and_still_reports_the_ece(tmp_path: Path) -> None:
    logits, labels = overconfident_logits(n=500)
    out = calibrate_split(False, True, logits, labels, tmp_path, "val", "val")
    assert out.temperature == 1.0 and not (tmp_path / CALIBRATION_FILE).exists()
    assert out.metrics["val/ece"] == out.metrics["val/ece_uncalibrated"] > 0
    assert contract_calibration(tmp_path) == {}


@pytest.mark.parametrize("stored, expected", [
    ({}, 1.0), ({"calibration": {"temperature": 1.7}}, 1.7), ({"calibration": {"temperature": "nan"}}, 1.0),
    ({"calibration": {"temperature": -2}}, 1.0), ({"calibration": {"temperature": "x"}}, 1.0),
    ({"calibration": {"temperature": 1e-40}}, 1.0), ({"calibration": {"temperature": None}}, 1.0),
    ({"calibration": "hot"}, 1.0)])
def test_contract_temperature_defaults_to_one_for_missing_or_unusable_values(stored: dict, expected: float) -> None:
    assert contract_temperature(stored) == expected


# ----------------------------------------------------------------------------------- in a run


def test_a_trained_model_carries_its_temperature_and_predict_applies_it(trained_segmentation: dict, tmp_path: Path) -> None:
    import medseg
    from tests.conftest import make_case

    run_dir = Path(trained_segmentation["run_dir"])
    fitted = json.loads((run_dir / CALIBRATION_FILE).read_text())
    contract = json.loads((run_dir / "contract.json").read_text())
    assert contract["calibration"]["temperature"] == fitted["temperature"] != 1.0
    assert contract["calibration"]["fitted_on"] == "val"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {"best_val/ece", "best_val/ece_uncalibrated", "best_val/nll", "calibration/temperature"} <= set(
        summary["metrics"])
    assert (run_dir / "plots" / "calibration_val_uncalibrated.png").is_file()
    assert (run_dir / "plots" / "calibration_val.png").is_file()

    # The same network with T = 1 and with T = 3: on the network's grid predict's probabilities
    # are softmax(logits / T), with the same arg-max. (Back on the scan's own grid the probabilities
    # are interpolated first, so a boundary voxel's arg-max may differ.)
    model = tmp_path / "model"
    shutil.copytree(run_dir / "model", model)
    spec = json.loads((model / "medseg_model.json").read_text())
    image, _, affine = make_case(seed=5)
    scan = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(image, affine), scan)
    preprocessed = torch.randn(1, 19, 22, 13, generator=torch.Generator().manual_seed(3))
    grid: dict[float, torch.Tensor] = {}
    masks: dict[float, np.ndarray] = {}
    for temperature in (1.0, 3.0):
        spec["contract"]["calibration"]["temperature"] = temperature
        (model / "medseg_model.json").write_text(json.dumps(spec))
        predictor = medseg.Predictor.from_uri(str(model), device="cpu", backend="torch")
        grid[temperature] = predictor._case_predictor.probabilities(preprocessed).double()
        masks[temperature] = predictor.predict(scan).label_map
    expected = torch.softmax(torch.log(grid[1.0].clamp(min=1e-30)) / 3.0, 0)
    torch.testing.assert_close(grid[3.0], expected, atol=1e-4, rtol=0)
    assert torch.equal(grid[1.0].argmax(0), grid[3.0].argmax(0))
    assert masks[1.0].shape == masks[3.0].shape == image.shape


def test_model_calibrate_gives_an_uncalibrated_run_a_calibrated_model(tmp_path: Path, tiny_run_inputs) -> None:
    from mlflow.tracking import MlflowClient

    from medseg.cli import EXIT_OK, main
    from tests.conftest import tiny_config, train_run

    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, validation={"overlays": 0, "hd95": False, "calibrate": False},
                         train={"max_epochs": 1, "batch_size": 2, "num_threads": 1})
    result = train_run(config)
    assert "calibration" not in json.loads((result.run_dir / "contract.json").read_text())
    assert not (result.run_dir / CALIBRATION_FILE).exists()
    assert "best_val/ece" in result.metrics and "calibration/temperature" not in result.metrics  # still measured

    assert main(["model", "calibrate", str(result.run_dir), "--no-progress"]) == EXIT_OK
    summary = json.loads((result.run_dir / "summary.json").read_text())
    contract = json.loads((result.run_dir / "contract.json").read_text())
    assert contract["calibration"]["temperature"] == summary["metrics"]["calibration/temperature"]
    assert summary["model_uri"] != result.model_uri and summary["metrics"]["best_val/dice_mean"] == pytest.approx(
        result.metrics["best_val/dice_mean"])  # nothing retrained: the masks are the same
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["medseg.model_uri"] == summary["model_uri"]
    assert run.data.metrics["calibration/temperature"] == contract["calibration"]["temperature"]


def test_model_calibrate_refuses_what_is_not_a_finished_run(tmp_path: Path) -> None:
    import medseg
    from medseg.errors import RunError

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "resolved_config.yaml").write_text("task: segmentation\n")
    with pytest.raises(RunError, match=r"expected a finished run folder, but best.safetensors, summary.json is missing"):
        medseg.calibrate_run(tmp_path)
