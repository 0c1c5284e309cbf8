"""Region-based training (nnU-Net, BraTS): config rules, region targets and their decoding, the
loss, region Dice, and a tiny region model trained, packaged and used for prediction."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from pydantic import ValidationError

import medseg
from medseg.cli import main
from medseg.engine.uncertainty import mean_foreground_entropy, normalised_binary_entropy
from medseg.errors import ModelError
from medseg.tasks.segmentation.config import SegmentationConfig, SegmentationLoss, SegmentationLossConfig
from medseg.tasks.segmentation.metrics import DiceBCELoss, SegmentationMetrics, create_loss
from medseg.tasks.segmentation.regions import Regions, decode_regions, region_masks, regions_target
from medseg.tasks.segmentation.training import build_network, model_contract
from tests.conftest import tiny_config, train_run

BRATS_LABELS = {0: "background", 1: "necrosis", 2: "edema", 3: "enhancing"}
BRATS_REGIONS = [{"name": "whole_tumour", "labels": [1, 2, 3]}, {"name": "tumour_core", "labels": [1, 3]},
                 {"name": "enhancing", "labels": [3]}]


def _config(regions: Any, labels: dict[int, str] | None = None) -> SegmentationConfig:
    return SegmentationConfig.model_validate({
        "task": "segmentation", "data": {"manifest": "cases.csv", "labels": labels or BRATS_LABELS},
        "patch": {"size": [16, 16, 8]}, "model": {"channels": [4, 8, 16]}, "regions": regions})


def _brats_regions() -> Regions:
    regions = Regions.from_config(_config(BRATS_REGIONS).regions)
    assert regions is not None
    return regions


def _nested_labels(shape: tuple[int, ...] = (13, 11, 7), seed: int = 3) -> torch.Tensor:
    """A BraTS-like label map on an odd grid: edema around a core of necrosis and an enhancing rim,
    plus a stray enhancing voxel touching the border and a lone necrosis voxel."""
    rng = np.random.default_rng(seed)
    label = np.zeros(shape, dtype=np.uint8)
    label[2:11, 1:10, 1:6] = 2
    label[4:9, 3:8, 2:5] = 3
    label[5:8, 4:7, 3:4] = 1
    label[0, 0, 0] = 3
    label[12, 10, 6] = 1
    label[rng.integers(0, shape[0], 5), rng.integers(0, shape[1], 5), rng.integers(0, shape[2], 5)] = 2
    return torch.from_numpy(label)


# ----------------------------------------------------------------------------------- config


def test_a_valid_region_config_paints_each_region_with_its_own_label() -> None:
    cfg = _config(BRATS_REGIONS)
    assert [r.name for r in cfg.regions or []] == ["whole_tumour", "tumour_core", "enhancing"]
    assert _brats_regions().paint == (2, 1, 3)
    assert build_network(cfg)(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)  # one output per region
    assert _config(None).regions is None


@pytest.mark.parametrize(("regions", "match"), [
    ([{"name": "a", "labels": [1, 2, 5]}, {"name": "b", "labels": [1, 3]}, {"name": "c", "labels": [3]}],
     r"regions.0 \('a'\) has label values \[5\] that data.labels does not define"),
    ([{"name": "a", "labels": [0, 1, 2, 3]}, {"name": "b", "labels": [1, 3]}, {"name": "c", "labels": [3]}],
     r"regions.0 \('a'\) holds 0, the background"),
    ([{"name": "a", "labels": [1, 3]}, {"name": "b", "labels": [1, 2, 3]}, {"name": "c", "labels": [3]}],
     r"regions.0 \('a', labels \[1, 3\]\): a region must leave exactly one .* every one of them is in a later"),
    ([{"name": "a", "labels": [1, 2, 3]}, {"name": "c", "labels": [3]}],
     r"regions.0 .* but \[1, 2\] are in no later region; list regions from the largest"),
    ([{"name": "a", "labels": [1, 3]}, {"name": "b", "labels": [3]}],
     r"no region holds label values \[2\] \(edema\)"),
    ([{"name": "a", "labels": [1, 2, 3]}, {"name": "a", "labels": [1, 3]}, {"name": "c", "labels": [3]}],
     r"regions.0.name 'a' is used by 2 regions"),
    ([{"name": "whole/tumour", "labels": [1, 2, 3]}, {"name": "b", "labels": [1, 3]}, {"name": "c", "labels": [3]}],
     r"regions.0.name 'whole/tumour' must be letters.*e.g. 'whole_tumour'"),
    ([{"name": "a", "labels": [1, 2, 3, 3]}, {"name": "b", "labels": [1, 3]}, {"name": "c", "labels": [3]}],
     r"lists a label value twice"),
    ([], r"regions is an empty list; leave it out"),
    ([{"name": "a", "labels": []}], r"regions.0.labels\n.*at least 1 item"),
    ([{"name": "a", "labels": [1, 2, 3], "paint": 2}], r"regions.0.paint\n.*Extra inputs are not permitted"),
])
def test_region_config_errors_name_the_rule_and_the_fix(regions: list[dict], match: str) -> None:
    with pytest.raises(ValidationError, match=match):
        _config(regions)


# ----------------------------------------------------------------------------------- targets and decoding


def test_region_targets_decode_back_to_the_original_labels() -> None:
    regions = _brats_regions()
    label = _nested_labels()
    target = regions_target(label[None, None].float(), regions)  # labels load as float
    assert target.shape == (1, 3, *label.shape) and target.dtype == torch.float32
    # nested: enhancing ⊂ core ⊂ whole
    assert bool((target[0, 2] <= target[0, 1]).all()) and bool((target[0, 1] <= target[0, 0]).all())
    assert torch.equal(target[0, 0].bool(), label != 0)
    assert torch.equal(region_masks(label, regions), target[0].bool())
    assert torch.equal(decode_regions(target[0], regions), label)
    logits = (target[0] * 2 - 1) * 3.0  # sigmoid > 0.5 exactly where the target is 1
    assert torch.equal(decode_regions(logits, regions, logits=True), label)
    assert torch.equal(decode_regions(torch.sigmoid(logits), regions), label)


def test_decoding_paints_in_order_so_a_later_region_wins() -> None:
    regions = _brats_regions()
    probabilities = torch.tensor([[0.9, 0.9, 0.4, 0.5], [0.2, 0.8, 0.1, 0.4], [0.1, 0.1, 0.6, 0.5]])
    # whole only -> 2 (edema); core too -> 1 (necrosis); enhancing, painted last, -> 3 even where the
    # whole tumour is below 0.5; exactly 0.5 is not above it -> background
    assert decode_regions(probabilities, regions).tolist() == [2, 1, 3, 0]
    with pytest.raises(ValueError, match=r"scores have 2 channels but there are 3 regions"):
        decode_regions(probabilities[:2], regions)
    with pytest.raises(ValueError, match=r"label must be \(B, 1, \*spatial\)"):
        regions_target(torch.zeros(1, 2, 4, 4), regions)


# ----------------------------------------------------------------------------------- loss and metrics


def test_region_loss_is_dice_plus_binary_cross_entropy_on_the_region_masks() -> None:
    regions = _brats_regions()
    torch.manual_seed(0)
    label = _nested_labels()[None, None].repeat(2, 1, 1, 1, 1)
    logits = torch.randn(2, 3, *label.shape[2:], requires_grad=True)
    loss = create_loss(SegmentationLossConfig(lambda_dice=0.5, lambda_ce=2.0), regions)
    value = loss(logits, label)
    target = regions_target(label, regions)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach(), target)
    dice = DiceBCELoss(lambda_dice=1.0, lambda_bce=0.0)(logits.detach(), target)
    assert float(value.detach()) == pytest.approx(float(0.5 * dice + 2.0 * bce), rel=1e-5)
    value.backward()
    assert logits.grad is not None and bool(torch.isfinite(logits.grad).all())
    for name in (SegmentationLoss.DICE, SegmentationLoss.DICE_FOCAL):
        assert math.isfinite(float(create_loss(SegmentationLossConfig(name=name), regions)(logits.detach(), label)))


def test_region_dice_is_counted_on_the_decoded_label_maps() -> None:
    regions = _brats_regions()
    truth = _nested_labels()
    pred = truth.clone()
    pred[truth == 3] = 1  # enhancing called necrosis: still core and whole tumour, enhancing missed
    metrics = SegmentationMetrics(BRATS_LABELS, hd95=False, regions=regions)
    metrics.update(pred, truth, case_id="c1")
    out = metrics.aggregate("val")
    assert out["val/dice_region/whole_tumour"] == 1.0 and out["val/dice_region/tumour_core"] == 1.0
    assert out["val/dice_region/enhancing"] == 0.0
    assert out["val/dice_region_mean"] == pytest.approx(2 / 3)
    assert out["val/dice/edema"] == 1.0 and out["val/dice/enhancing"] == 0.0  # per-label Dice as for softmax
    assert metrics.per_case[0]["dice_region/enhancing"] == 0.0
    plain = SegmentationMetrics(BRATS_LABELS, hd95=False)
    plain.update(pred, truth)
    assert not any("region" in k for k in plain.aggregate("val"))


def test_binary_entropy_of_region_sigmoids() -> None:
    p = torch.tensor([[0.5, 1.0, 0.0], [0.5, 0.0, 0.5]])
    np.testing.assert_allclose(normalised_binary_entropy(p).numpy(), [1.0, 0.0, 0.5], atol=1e-6)
    labels = torch.tensor([1, 0, 0])
    assert mean_foreground_entropy(p, labels, sigmoid=True) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="decoded label map"):
        mean_foreground_entropy(p, sigmoid=True)


# ----------------------------------------------------------------------------------- contract


def test_the_contract_carries_the_regions_and_the_sigmoid() -> None:
    contract = model_contract(_config(BRATS_REGIONS))
    assert contract["output_activation"] == "sigmoid"
    assert contract["regions"] == [{"name": "whole_tumour", "labels": [1, 2, 3], "paint": 2},
                                   {"name": "tumour_core", "labels": [1, 3], "paint": 1},
                                   {"name": "enhancing", "labels": [3], "paint": 3}]
    stored = json.loads(json.dumps(contract))  # what a model folder holds
    assert Regions.from_contract(stored, "model m") == _brats_regions()
    softmax = model_contract(_config(None))
    assert softmax["output_activation"] == "softmax" and "regions" not in softmax
    assert Regions.from_contract(softmax, "model m") is None


@pytest.mark.parametrize(("change", "match"), [
    ({"regions": None}, r"model m: its contract says output_activation: sigmoid but carries no regions"),
    ({"output_activation": "softmax"}, r"carries regions but output_activation is 'softmax'"),
    ({"regions": [{"name": "whole_tumour", "labels": [1, 2, 3], "paint": 3}]}, r"regions .* are not valid"),
])
def test_an_inconsistent_contract_is_refused(change: dict, match: str) -> None:
    contract = {**json.loads(json.dumps(model_contract(_config(BRATS_REGIONS)))), **change}
    with pytest.raises(ModelError, match=match):
        Regions.from_contract(contract, "model m")


def test_a_contract_whose_paint_order_disagrees_is_refused() -> None:
    contract = json.loads(json.dumps(model_contract(_config(BRATS_REGIONS))))
    contract["regions"][0]["paint"] = 1
    with pytest.raises(ModelError, match=r"paint \[1, 1, 3\], but their labels give \[2, 1, 3\]"):
        Regions.from_contract(contract, "model m")


# ----------------------------------------------------------------------------------- end to end

TINY_REGIONS = [{"name": "foreground", "labels": [1, 2]}, {"name": "blob_two", "labels": [2]}]


def test_a_region_model_trains_and_predicts_label_values(tmp_path: Path, tiny_run_inputs) -> None:
    dataset, manifest = tiny_run_inputs
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = tiny_config(tmp_path, dataset, manifest, uri, regions=TINY_REGIONS, train={"max_epochs": 1},
                         validation={"overlays": 1, "hd95": False})
    result = train_run(config)
    for key in ("val/dice/blob1", "val/dice/blob2", "val/dice_mean", "val/dice_region/foreground",
                "val/dice_region/blob_two", "val/dice_region_mean"):
        value = result.metrics[key]
        assert value is None or 0.0 <= value <= 1.0, key
    assert not any("ece" in k or "temperature" in k for k in result.metrics)  # no softmax calibration
    assert result.model_uri

    predictor = medseg.Predictor.from_uri(result.model_uri, device="cpu", tracking_uri=uri, tta=True)
    contract = predictor.contract
    assert contract["output_activation"] == "sigmoid" and "calibration" not in contract
    assert contract["regions"] == [{"name": "foreground", "labels": [1, 2], "paint": 1},
                                   {"name": "blob_two", "labels": [2], "paint": 2}]
    assert predictor.model.networks[0](torch.zeros(1, 1, 16, 16, 8)).shape == (1, 2, 16, 16, 8)
    assert "max_mean_entropy" in contract["qc"]

    image_path = dataset / "imagesTr" / "case_000.nii.gz"
    prediction = predictor.predict(image_path)
    shape = tuple(np.asarray(nib.load(image_path).dataobj).shape)
    probabilities = prediction.probabilities
    assert probabilities is not None and probabilities.shape == (2, *shape)
    assert probabilities.min() >= 0.0 and probabilities.max() <= 1.0
    mask = prediction.label_map
    assert mask is not None and mask.shape == shape and set(np.unique(mask)) <= {0, 1, 2}
    expected = decode_regions(torch.from_numpy(probabilities), Regions.from_contract(contract, "m"))  # type: ignore[arg-type]
    np.testing.assert_array_equal(mask, expected.numpy())
    assert 0.0 <= float(prediction.uncertainty["mean_entropy"] or 0.0) <= 1.0
    assert prediction.uncertainty["agreement"] is not None  # TTA: several samples, decoded each

    out = tmp_path / "out"  # `medseg predict` itself, review included
    assert main(["predict", "--model", result.model_uri, "--input", str(dataset / "imagesTr"), "--output", str(out),
                 "--tracking-uri", uri, "--tta", "--save-probabilities", "--save-uncertainty", "--no-progress"]) == 0
    with open(out / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 6 and all(r["status"] == "ok" and r["mean_entropy"] and r["agreement"] for r in rows)
    written = np.asarray(nib.load(out / "case_000_probabilities.nii.gz").dataobj)
    assert written.shape == (*shape, 2)  # the region sigmoids, channel last
    assert (out / "case_000_entropy.nii.gz").is_file() and (out / "review.html").is_file()
