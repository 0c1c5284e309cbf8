"""Uncertainty from the spread of flips and members: hand-computed cases, then through predict."""

from __future__ import annotations

import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import medseg
from medseg.engine.tta import average_predictions, predict_samples
from medseg.engine.uncertainty import mean_foreground_entropy, normalised_entropy, sample_agreement
from tests.conftest import REPO, make_case


def test_entropy_is_zero_when_certain_and_one_when_uniform() -> None:
    p = torch.tensor([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])  # 3 classes, 3 positions
    np.testing.assert_allclose(normalised_entropy(p).numpy(), [0.0, math.log(2) / math.log(3), 1.0], atol=1e-6)


def test_foreground_entropy_averages_only_where_foreground_is_predicted() -> None:
    p = torch.tensor([[0.9, 0.5, 1.0], [0.1, 0.5, 0.0]])  # position 1 is a tie: argmax picks background
    labels = torch.tensor([0, 1, 0])
    assert mean_foreground_entropy(p, labels) == pytest.approx(1.0)
    assert mean_foreground_entropy(p, torch.zeros(3, dtype=torch.long)) == pytest.approx(
        float(normalised_entropy(p).mean()))  # nothing predicted: all voxels


def test_agreement_is_the_mean_dice_of_the_samples_with_the_consensus() -> None:
    consensus = torch.tensor([0, 1, 1, 2, 2])
    same = consensus.clone()
    half = torch.tensor([0, 1, 0, 2, 0])  # label 1: Dice 2/3; label 2: Dice 2/3
    assert sample_agreement([same], consensus, [1, 2]) is None  # one sample: no spread
    assert sample_agreement([same, half], consensus, [1, 2]) == pytest.approx((1.0 + 2 / 3) / 2)
    empty = torch.zeros(5, dtype=torch.long)
    assert sample_agreement([empty, empty], empty, [1, 2]) == pytest.approx(1.0)  # absent everywhere: agree


def test_samples_keep_each_flip_and_the_variance_between_them() -> None:
    image = torch.arange(6, dtype=torch.float32).reshape(1, 6)

    def predict(member: float, x: torch.Tensor) -> torch.Tensor:  # not flip-equivariant: the flips disagree
        fg = torch.sigmoid(member * (x - 2.5) + torch.linspace(-1, 1, 6))
        return torch.cat([1 - fg, fg])

    samples = predict_samples([1.0, -1.0], image, 1, True, predict, keep_spread=True)
    outputs = [predict(m, image) if not f else predict(m, image.flip(-1)).flip(-1)
               for m in (1.0, -1.0) for f in (False, True)]
    stacked = torch.stack(outputs)
    assert samples.count == 4 and len(samples.labels) == 4
    torch.testing.assert_close(samples.mean, stacked.mean(0))
    torch.testing.assert_close(samples.variance, stacked.var(0, unbiased=False).sum(0))
    assert [s.tolist() for s in samples.labels] == [o.argmax(0).tolist() for o in outputs]
    torch.testing.assert_close(average_predictions([1.0, -1.0], image, 1, True, predict), samples.mean)


def test_predict_reports_uncertainty_and_writes_its_maps_on_the_input_grid(trained_segmentation: dict[str, str],
                                                                         tmp_path: Path) -> None:
    predictor = medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu", tta=True,
                                          tracking_uri=trained_segmentation["tracking_uri"])
    image, _, affine = make_case((15, 17, 9), seed=301)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "in" / "scan.nii.gz")
    batch = predictor.predict_folder(tmp_path / "in", tmp_path / "out", save_uncertainty=True, progress=False)
    (result,) = batch.results
    assert result.status == "ok", result.error
    assert 0.0 <= result.values["mean_entropy"] <= 1.0 and 0.0 <= result.values["agreement"] <= 1.0
    for key in ("entropy", "variance"):
        written = nib.load(result.outputs[key])
        assert written.shape == image.shape and np.allclose(written.affine, affine, atol=1e-4)
        data = np.asarray(written.dataobj)
        assert np.all(np.isfinite(data)) and data.min() >= -1e-6
    single = medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu",
                                       tracking_uri=trained_segmentation["tracking_uri"])
    prediction = single.predict(tmp_path / "in" / "scan.nii.gz")
    assert prediction.uncertainty["agreement"] is None and prediction.variance is None  # one sample: no spread
    assert 0.0 <= float(prediction.uncertainty["mean_entropy"]) <= 1.0


def test_tta_flips_only_the_axes_the_model_was_trained_to_see_flipped() -> None:
    from medseg.engine.tta import flip_combinations, tta_axes
    from medseg.errors import PredictOptionError

    assert flip_combinations(3, True) == [(), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)]
    assert flip_combinations(3, True, [0]) == [(), (0,)]
    assert flip_combinations(3, True, [2, 0]) == [(), (0,), (2,), (0, 2)]
    assert flip_combinations(3, False, [0]) == [()]
    assert tta_axes({"tta_axes": [0, 2]}, True, "m") == [0, 2]
    assert tta_axes({}, True, "m") is None  # a model from before medseg recorded them: every axis, as then
    with pytest.raises(PredictOptionError, match="--tta: model x was trained without flip augmentation"):
        tta_axes({"tta_axes": []}, True, "model x")
    assert tta_axes({"tta_axes": []}, False, "model x") == []


def test_the_contract_records_the_flipped_axes_of_the_training_augmentation(tmp_path: Path) -> None:
    from medseg.engine.loop import trained_flip_axes

    base = medseg.load_config(REPO / "configs" / "msd_hippocampus.yaml")
    assert trained_flip_axes(base) == []  # trained without flips: --tta is refused for its models
    flipped = medseg.load_config(REPO / "configs" / "msd_hippocampus.yaml",
                                 overrides=["augment=[{name: flip, axes: [0]}, {name: flip, axes: [2]}]"])
    assert trained_flip_axes(flipped) == [0, 2]
    every = medseg.load_config(REPO / "configs" / "msd_hippocampus.yaml", overrides=["augment=[{name: flip}]"])
    assert trained_flip_axes(every) == [0, 1, 2]


def test_predicted_volumes_are_scored_against_the_training_split_and_flagged(trained_segmentation: dict[str, str],
                                                                           tmp_path: Path) -> None:
    from medseg.data.manifest import read_manifest
    from medseg.errors import PredictOptionError

    contract = medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu",
                                         tracking_uri=trained_segmentation["tracking_uri"]).contract
    manifest = read_manifest(Path(trained_segmentation["tmp"]) / "manifest.csv")
    root = Path(trained_segmentation["tmp"]) / "dataset"
    volumes = []
    for case in manifest.split("train"):
        label = nib.load(case.label_path(root))
        volumes.append(float((np.asarray(label.dataobj) == 1).sum()) * abs(np.linalg.det(label.affine[:3, :3])) / 1000)
    stats = contract["label_volumes_ml"]["blob1"]
    assert stats["cases"] == len(volumes) and stats["mean"] == pytest.approx(np.mean(volumes))
    assert stats["std"] == pytest.approx(np.std(volumes)) and contract["qc"]["max_abs_volume_z"] == 3.0
    import csv

    with open(Path(trained_segmentation["run_dir"]) / "evaluation" / "val_cases.csv", newline="") as fh:
        val_entropy = [float(row["mean_entropy"]) for row in csv.DictReader(fh)]
    assert val_entropy and contract["qc"]["max_mean_entropy"] == pytest.approx(np.quantile(val_entropy, 0.9), abs=1e-4)

    image, _, affine = make_case((15, 17, 9), seed=302)
    (tmp_path / "in").mkdir()
    nib.save(nib.Nifti1Image(image, affine), tmp_path / "in" / "scan.nii.gz")
    strict = medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu", qc={"max_abs_volume_z": 0.0},
                                       tracking_uri=trained_segmentation["tracking_uri"])
    (result,) = strict.predict_folder(tmp_path / "in", tmp_path / "out", progress=False).results
    z = result.values["volume_z_blob1"]
    assert z == pytest.approx((result.values["volume_ml_blob1"] - stats["mean"]) / stats["std"], abs=1e-2)
    assert result.values["qc_flag"] is True and "blob1 volume z =" in result.values["qc_reason"]
    single = strict.predict(tmp_path / "in" / "scan.nii.gz")  # in memory: the same check as the batch's row
    assert single.qc == {k: v for k, v in result.values.items() if k.startswith(("volume_z_", "qc_"))}
    with pytest.raises(PredictOptionError, match="--qc max_volume=1.0: unknown threshold"):
        medseg.Predictor.from_uri(trained_segmentation["model_uri"], device="cpu", qc={"max_volume": 1.0},
                                  tracking_uri=trained_segmentation["tracking_uri"])
